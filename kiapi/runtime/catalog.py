"""The built-in model catalog (registry entries for every capability kiapi serves)."""

from __future__ import annotations

from kiapi.runtime.registry import ModelSpec, Registry

EMBEDDING = "embedding"

_NO_ENGINE_HINT = (
    "this kiapi build has no MLX embedding engine yet, so no embedding model can be loaded; "
    "it arrives with the embedding engine release"
)


def embedding_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="qwen3-embedding-8b",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="mlx-community/Qwen3-Embedding-8B-mxfp8",
            aliases=("text", "qwen3-embedding"),
            features=("text",),
            default=True,
            weight_gb=8.6,
            peak_headroom_gb=1.0,
            set_up_hint=_NO_ENGINE_HINT,
        ),
        ModelSpec(
            name="qwen3-vl-embedding-2b",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="mlx-community/Qwen3-VL-Embedding-2B-mxfp8",
            aliases=("vl", "qwen3-vl-embedding"),
            features=("text", "image"),
            weight_gb=2.4,
            peak_headroom_gb=1.0,
            set_up_hint=_NO_ENGINE_HINT,
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="sentence-transformers/all-MiniLM-L6-v2",
            aliases=("minilm", "all-minilm"),
            features=("text",),
            weight_gb=0.1,
            peak_headroom_gb=0.2,
            set_up_hint=_NO_ENGINE_HINT,
        ),
    ]


def default_registry() -> Registry:
    return Registry(embedding_models())
