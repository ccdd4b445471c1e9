"""The engine table: catalog entries name an engine; this module resolves the name to the
loader that makes the model resident. Engine modules (the only ones importing MLX) are
imported on the first load, so the catalog, the registry and the request side never import
them.

To add an engine: a module with ``load(spec) -> LoadedModel`` and a line in :data:`ENGINES`.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterable

from kiapi.runtime.errors import ModelNotSetUp
from kiapi.runtime.registry import LoadedModel, ModelSpec

ENGINES: dict[str, str] = {
    "mlx-embeddings": "kiapi.runtime.mlx_engine:load_embedding_model",  # BERT, Qwen3, Qwen3-VL
    "mlx-lm": "kiapi.runtime.llm_engine:load_chat_model",  # GGUF llama, HF-layout decoders
    "mlx-cross-encoder": "kiapi.runtime.rerank_engine:load_reranker",  # BERT, XLM-R rerankers
}


# The importable modules each engine needs (a model whose engine misses one is not set up).
REQUIRES: dict[str, tuple[str, ...]] = {
    "mlx-embeddings": ("mlx", "mlx_embeddings", "tokenizers"),
    "mlx-lm": ("mlx", "mlx_lm", "tokenizers", "jinja2"),
    "mlx-cross-encoder": ("mlx", "mlx_embeddings", "tokenizers"),
}


# What is worth importing ahead of an engine's first load, on a side thread (:func:`prefetch`):
# plain modules with a slow import. Never a package kiapi imports in a special way
# (mlx_embeddings: mlx_engine.architecture() keeps its __init__ from running).
PREFETCH: dict[str, tuple[str, ...]] = {
    "mlx-lm": ("mlx_lm.generate",),  # mlx-lm's __init__ pulls in transformers: ~0.8 s
}
_prefetching: dict[str, threading.Thread] = {}  # engine -> its prefetch thread


def prefetch(engines: Iterable[str]) -> None:
    """Start importing :data:`PREFETCH`'s modules of ``engines`` on a daemon thread, so their
    import overlaps serving and the loads of other engines' models. :func:`load` waits for an
    engine's prefetch before loading with it, so two threads never import one package at the
    same time (transformers' lazy modules are not safe for that). Call it only after the BLAS
    is chosen (``blas.activate``); MLX itself is imported here, on the calling thread. A
    failed import is left for the load to report, with its hint."""
    wanted = [e for e in dict.fromkeys(engines) if e in PREFETCH and e not in _prefetching]
    if not wanted:
        return
    with contextlib.suppress(Exception):
        importlib.import_module("mlx.nn")  # shared by every engine: before any other thread
    modules = list(dict.fromkeys(m for e in wanted for m in PREFETCH[e]))

    def run() -> None:
        for module in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(module)

    thread = threading.Thread(target=run, name="kiapi-prefetch", daemon=True)
    for engine in wanted:
        _prefetching[engine] = thread
    thread.start()


def loader_of(engine: str):
    """The load function of ``engine`` (imports its module)."""
    try:
        target = ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}") from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load(spec: ModelSpec) -> LoadedModel:
    """The production loader: the spec's engine, or 503 if the model is not set up."""
    spec.require_set_up()
    if spec.engine is None:
        raise ModelNotSetUp(f"model {spec.name!r} names no engine")
    if (thread := _prefetching.get(spec.engine)) is not None:
        thread.join()
    return loader_of(spec.engine)(spec)
