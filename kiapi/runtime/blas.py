"""Give MLX an optimized BLAS on Linux.

The ``mlx[cpu]`` wheel for Linux links the reference (netlib) BLAS: a 1024x1024 fp32 matmul ran
at ~5 GFLOP/s here, against ~180 with OpenBLAS. MLX resolves ``cblas_sgemm`` and friends through
the dynamic linker, so a BLAS loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is first imported
provides them instead. OpenBLAS was chosen by measurement (``bench/blas_matmul.py``): OpenBLAS
0.3.33 was the fastest on every shape measured, Debian's 0.3.21 the fastest on large ones; MKL
2026.2 was slower on large shapes and beat 0.3.21 only on the 12-row matmuls of one sentence.
``auto`` takes 0.3.33 from the ``ngsolve-openblas`` wheel when it loads, else the system's.

Invariants:

* :func:`activate` runs at most once per process (the first call's choice holds) and must run
  before anything imports ``mlx.core``; :mod:`kiapi.runtime.mlx_engine` calls it right before
  its lazy import, and the runtime calls it at start-up to report the result. If MLX is already
  imported, the call reports that the choice cannot take effect.
* On macOS nothing is loaded: MLX uses Metal and Accelerate there.
* No MLX import here; this module only uses ``ctypes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"

FIX_HINT = (
    "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; scripts/setup.sh "
    "does it when run as root) or point KIAPI_BLAS at a library that exports cblas_sgemm"
)


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX's CPU work runs on."""

    name: str  # e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64"
    path: str | None  # the library loaded, None when nothing was loaded
    optimized: bool
    note: str = ""  # why this BLAS, or what went wrong

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.name}{where}" + (f" - {self.note}" if self.note else "")


_lock = threading.Lock()
_status: BlasStatus | None = None
_loaded: dict[str, ctypes.CDLL] = {}  # path -> the library, for its thread control


WHEEL_PACKAGE = "ngsolve_openblas"  # PyPI ngsolve-openblas: upstream OpenBLAS, pthreads


def wheel_openblas() -> list[str]:
    """The OpenBLAS shipped by the ``ngsolve-openblas`` wheel (a kiapi dependency on x86-64
    Linux), found without importing the package (its ``__init__`` loads the library)."""
    import importlib.util

    found = importlib.util.find_spec(WHEEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return []
    return sorted(
        str(p) for d in found.submodule_search_locations for p in Path(d).glob("libopenblas*.so*")
    )


def openblas_candidates() -> list[str]:
    """Where OpenBLAS usually lives, preferred first: the wheel's upstream build (0.3.33 twice
    as fast on one sentence's matmuls as Debian 12's 0.3.21), then system pthread builds."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    names = ["openblas-pthread/libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so.0"]
    found = wheel_openblas()
    found += [str(Path(d) / n) for d in dirs for n in names if (Path(d) / n).exists()]
    by_ldconfig = ctypes.util.find_library("openblas")
    if by_ldconfig:
        found.append(by_ldconfig)
    return list(dict.fromkeys(found))


def loadable_openblas() -> str | None:
    """The first candidate that loads and exports ``cblas_sgemm`` (the wheel's build needs
    the system's libgfortran5), or None. Loads it into this process."""
    status = _first_loadable()
    return status.path if status is not None else None


def _first_loadable() -> BlasStatus | None:
    for path in openblas_candidates():
        status = _load(path)
        if status is not None:
            return status
    return None


def _describe_library(lib: ctypes.CDLL, path: str) -> str:
    get_config = getattr(lib, "openblas_get_config", None)
    if get_config is None:
        return Path(path).name
    get_config.restype = ctypes.c_char_p
    name = get_config().decode(errors="replace").strip()
    threads = getattr(lib, "openblas_get_num_threads", None)
    return f"{name}, {threads()} threads" if threads else name


def _load(path: str) -> BlasStatus | None:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("cannot load BLAS %s: %s", path, exc)
        return None
    if not hasattr(lib, "cblas_sgemm"):
        log.debug("%s does not export cblas_sgemm", path)
        return None
    _loaded[path] = lib
    return BlasStatus(_describe_library(lib, path), path, optimized=True)


def _choose(setting: str) -> BlasStatus:
    if sys.platform == "darwin":
        return BlasStatus("Accelerate (via MLX)", None, optimized=True, note="macOS: left to MLX")
    if not sys.platform.startswith("linux"):
        return BlasStatus("MLX default", None, optimized=False, note=f"{sys.platform}: untouched")
    if "mlx.core" in sys.modules:
        return BlasStatus(
            "unknown (mlx.core was imported before kiapi could load a BLAS)",
            None,
            optimized=False,
            note="import kiapi's engine before mlx, or let kiapi import mlx",
        )
    if setting.lower() == NONE:
        return BlasStatus(
            "MLX's bundled reference BLAS", None, optimized=False, note="KIAPI_BLAS=none"
        )
    if setting.lower() != AUTO:
        status = _load(setting)
        if status is None:
            return BlasStatus(
                "MLX's bundled reference BLAS",
                None,
                optimized=False,
                note=f"KIAPI_BLAS={setting} could not be loaded or lacks cblas_sgemm; {FIX_HINT}",
            )
        return status
    status = _first_loadable()
    if status is not None:
        return status
    return BlasStatus(
        "MLX's bundled reference BLAS",
        None,
        optimized=False,
        note=f"no OpenBLAS found, CPU inference runs ~20-35x slower; {FIX_HINT}",
    )


def activate(setting: str = AUTO) -> BlasStatus:
    """Load the BLAS MLX should use (once per process) and return what is active.

    ``setting`` is ``auto`` (find OpenBLAS), ``none`` (keep MLX's bundled BLAS) or a library
    path. Warns loudly when MLX is left on the reference BLAS on Linux.
    """
    global _status
    with _lock:
        if _status is None:
            _status = _choose(setting)
            if _status.optimized:
                log.info("BLAS for MLX: %s", _status.describe())
            else:
                log.warning("BLAS for MLX is NOT optimized: %s", _status.describe())
        return _status


def set_threads(count: int) -> bool:
    """Set how many threads the active OpenBLAS uses per call; False if it cannot be told.

    The engine calls it between forward passes (never while MLX has BLAS work in flight): one
    thread per call when it runs two halves of a batch on two MLX streams, all cores otherwise.
    """
    lib = _loaded.get(_status.path) if _status is not None and _status.path else None
    setter = getattr(lib, "openblas_set_num_threads", None) if lib is not None else None
    if setter is None:
        return False
    setter(int(count))
    return True
