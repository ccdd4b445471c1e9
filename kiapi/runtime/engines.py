"""The engine table: catalog entries name an engine; this module resolves the name to the
loader that makes the model resident. Engine modules (the only ones importing MLX) are
imported on the first load, so the catalog, the registry and the request side never import
them.

To add an engine: a module with ``load(spec) -> LoadedModel`` and a line in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib

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
    return loader_of(spec.engine)(spec)
