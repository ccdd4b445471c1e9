"""The peer servers the benchmarks measure kiapi against, each in its own virtualenv.

Peers are never installed into kiapi's environment (they need torch, optimum or a compiled
llama.cpp). :func:`python_for` creates ``<cache>/venvs/<peer>`` on first use from the pinned
requirements below and returns its interpreter; a stamp file holds the hash of the
requirements, so a changed pin rebuilds that venv and nothing else. The cache folder is
``$KIAPI_BENCH_CACHE`` or ``~/.cache/kiapi-bench``.

First use costs minutes (llama-cpp-python compiles llama.cpp: about 5 minutes on 2 CPUs);
later runs cost nothing. Every install is bounded by ``INSTALL_TIMEOUT_S``.

    .venv/bin/python bench/peers.py [PEER ...]   # create (or check) the venvs, print them
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_TIMEOUT_S = 1800

# torch 2.13.0 is the CPU build pip finds on this machine kind's disk; any other version (or a
# dependency allowed to pull a newer one) downloads a multi-GB CUDA build, so it is pinned
# first and again beside the rest.
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    name: str
    steps: tuple[tuple[str, ...], ...]  # pip install argument lists, run in order
    env: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        text = repr((self.steps, sorted(self.env.items())))
        return hashlib.sha256(text.encode()).hexdigest()


# Pins found by building each venv from scratch here (2026-12-03); each is there for a reason:
COMMON_SERVER = (
    "huggingface_hub==0.36.2",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.32.1",
    "pydantic==2.14.4",
    "numpy==1.26.4",  # infinity 0.0.78 and optimum 1.x predate numpy 2
)
PEERS = {
    peer.name: peer
    for peer in (
        Peer(
            "infinity-torch",
            (
                (TORCH,),
                (
                    TORCH,
                    "infinity-emb[server,torch]==0.0.78",
                    "transformers==4.57.6",
                    "tokenizers==0.22.2",
                    "sentence-transformers==3.4.1",
                    *COMMON_SERVER,
                ),
            ),
        ),
        Peer(
            "infinity-optimum",
            (
                (TORCH,),
                (
                    TORCH,
                    "infinity-emb[server,optimum]==0.0.78",
                    # 1.27 imports a torch.onnx helper torch 2.13 moved; 1.26 refuses the path
                    # infinity passes for a local folder
                    "optimum[onnxruntime]==1.24.0",
                    "onnxruntime==1.32.0",
                    "onnx==1.23.2",
                    "transformers==4.48.3",  # optimum 1.24's upper bound
                    "tokenizers==0.21.4",
                    "datasets==5.0.1",
                    "pyarrow==25.0.1",  # 26 needs numpy 2
                    *COMMON_SERVER,
                ),
            ),
        ),
        Peer(
            # not a server: the independent reference tests/fixtures/tiny/make_tiny.py runs in
            # (transformers and sentence-transformers on torch, never kiapi's MLX code)
            "reference",
            (
                (TORCH,),
                (
                    TORCH,
                    "transformers==4.57.6",
                    "tokenizers==0.22.2",
                    "sentence-transformers==3.4.1",
                    "safetensors==0.7.0",
                    "numpy==2.2.6",
                ),
            ),
        ),
        Peer(
            "llamacpp",
            (("llama-cpp-python[server]==0.3.16",),),
            # built here from source; native, so it uses what this CPU has (AVX2, AVX-512)
            env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"},
        ),
    )
}
PEER_ENV = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}  # loopback only


def cache_folder() -> Path:
    root = os.environ.get("KIAPI_BENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kiapi-bench"


def python_for(name: str, log=print) -> Path:
    """The interpreter of ``name``'s venv, created or rebuilt first when its pins changed."""
    peer = PEERS[name]
    folder = cache_folder() / "venvs" / name
    stamp = folder / ".kiapi-bench-stamp"
    python = folder / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == peer.digest():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating the {name} venv in {folder} (first use; minutes)")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    env = {**os.environ, **peer.env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in peer.steps:
        left = INSTALL_TIMEOUT_S - (time.monotonic() - started)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *step],
            check=True,
            env=env,
            timeout=max(left, 1),
        )
    stamp.write_text(peer.digest())
    log(f"{name}: ready in {time.monotonic() - started:.0f} s")
    return python


ONNX_EXPORT = """
import functools, sys, torch, torch.onnx
# torch >= 2.9 exports through dynamo (needs onnxscript); optimum 1.x expects the old exporter
torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="feature-extraction", library_name="transformers")
"""


def onnx_copy(folder: Path, name: str) -> Path:
    """An ONNX export of the sentence-transformers ``folder`` (made once, by optimum in the
    infinity-optimum venv): infinity 0.0.78's optimum engine refuses a folder without one and
    writes its optimized file beside it, so it gets this copy, never kiapi's folder."""
    out = cache_folder() / "onnx" / name
    if not (out / "model.onnx").exists():
        shutil.rmtree(out, ignore_errors=True)
        python = python_for("infinity-optimum")
        subprocess.run(
            [str(python), "-c", ONNX_EXPORT, str(folder), str(out)],
            check=True,
            env={**os.environ, **PEER_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=600,
        )
    return out


def main() -> None:
    for name in sys.argv[1:] or list(PEERS):
        print(f"{name}: {python_for(name)}")


if __name__ == "__main__":
    main()
