"""MLX gets an optimized BLAS on Linux: proven by where the dynamic linker binds libmlx's
``cblas_sgemm`` (``LD_DEBUG=bindings``), in fresh processes."""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiapi.runtime import blas
from kiapi.runtime.blas import openblas_candidates, wheel_openblas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PROBE = """
import json, sys
{before}
from kiapi.runtime import blas
status = blas.activate(sys.argv[1])
import mlx.core as mx
a = mx.ones((64, 64))
mx.eval(a @ a)
print(json.dumps({{"name": status.name, "path": status.path, "optimized": status.optimized,
                  "note": status.note}}))
"""


def probe(setting: str, before: str = "") -> tuple[dict, str]:
    """Activate ``setting`` in a fresh process; returns the status and what libmlx's
    ``cblas_sgemm`` was bound to."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before), setting],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_DEBUG": "bindings"},
        timeout=120,
        check=True,
    )
    bound = re.findall(
        r"binding file \S*libmlx\.so \[0\] to (\S+) \[0\]: normal symbol `cblas_sgemm'", done.stderr
    )
    assert len(bound) == 1, "libmlx's cblas_sgemm was not bound exactly once"
    return json.loads(done.stdout.strip().splitlines()[-1]), bound[0]


def test_auto_binds_mlx_to_openblas():
    assert openblas_candidates(), "no OpenBLAS: the wheel dependency is missing (reinstall)"
    status, bound = probe("auto")
    assert status["optimized"] and status["name"].startswith("OpenBLAS")
    assert os.path.realpath(bound) == os.path.realpath(status["path"])


def test_explicit_library_path_is_used():
    path = openblas_candidates()[0]
    status, bound = probe(path)
    if "relinked" in status["note"]:  # this machine has no libgfortran5: a relinked copy
        assert Path(status["path"]).name == Path(path).name and status["path"] != path
    else:
        assert status["path"] == path
    assert os.path.realpath(bound) == os.path.realpath(status["path"])


def needed(library: str) -> list[str]:
    done = subprocess.run(
        [blas._patchelf(), "--print-needed", library], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


@pytest.mark.skipif(not wheel_openblas(), reason="no OpenBLAS wheel for this CPU")
def test_the_wheels_openblas_relinked_to_mlxs_libgfortran_needs_no_system_runtime(tmp_path):
    (wheel,) = wheel_openblas()
    assert "libgfortran.so.5" in needed(wheel)  # why: a bare machine lacks it
    copy = blas.relinked(wheel, cache=tmp_path)
    assert copy is not None and Path(copy).is_relative_to(tmp_path)
    assert "libgfortran.so.5" not in needed(copy)
    assert blas.bundled_gfortran().name in needed(copy)
    assert blas.relinked(wheel, cache=tmp_path) == copy  # made once
    assert not list(tmp_path.rglob("*.part"))
    status, bound = probe(copy)
    assert status["optimized"] and "OpenBLAS 0.3" in status["name"]
    assert os.path.realpath(bound) == os.path.realpath(copy)


def test_none_keeps_the_bundled_blas_and_warns():
    status, bound = probe("none")
    assert not status["optimized"] and "openblas" not in bound.lower()


def test_unloadable_library_falls_back_loudly():
    status, bound = probe("/nonexistent/libblas.so")
    assert not status["optimized"] and "KIAPI_BLAS=/nonexistent/libblas.so" in status["note"]
    assert "KIAPI_BLAS" in status["note"] and "pip" in status["note"]
    assert "openblas" not in bound.lower()


def test_too_late_when_mlx_was_imported_first():
    status, bound = probe("auto", before="import mlx.core")
    assert not status["optimized"] and "imported before" in status["name"]
    assert "openblas" not in bound.lower()


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the ngsolve-openblas wheel is a dependency on x86-64 Linux only",
)
def test_auto_prefers_the_wheels_upstream_openblas():
    (wheel,) = wheel_openblas()
    assert openblas_candidates()[0] == wheel
    status, bound = probe("auto")
    assert "OpenBLAS 0.3.3" in status["name"]
    assert status["path"] == wheel or Path(status["path"]).name == Path(wheel).name  # relinked
    assert os.path.realpath(bound) == os.path.realpath(status["path"])


IDLE_PROBE = """
import resource, sys, time
from kiapi.runtime import blas
blas.activate("auto")
import mlx.core as mx
a = mx.random.normal((512, 512))
mx.eval(a @ a)  # a product on every core
used = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start = used()
time.sleep(0.3)
print(used() - start)
"""


@pytest.mark.parametrize(("setting", "spins"), [(None, False), ("28", True)])
def test_openblas_threads_sleep_soon_after_a_product_unless_told_otherwise(setting, spins):
    """OpenBLAS's idle threads busy-wait ~0.1 s after a threaded call by default: a core taken
    from the event loop and kiapi's kernel on a 2-core machine. kiapi sets
    OPENBLAS_THREAD_TIMEOUT before loading it, unless the user did (28: OpenBLAS's default).
    CPU time in a 0.3 s sleep after one product: a spinning thread burns tens of ms."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if setting is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = setting
    done = subprocess.run(
        [sys.executable, "-c", IDLE_PROBE], capture_output=True, text=True, env=env,
        timeout=120, check=True,
    )  # fmt: skip
    burnt = float(done.stdout.strip().splitlines()[-1])
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: OpenBLAS runs no threads")
    assert (burnt > 0.03) == spins, burnt
