"""The MLX embedding engine: the only module of kiapi that imports MLX.

MLX is imported lazily, on first use, after :func:`kiapi.runtime.blas.activate` has given it an
optimized BLAS. Loading and embedding run on the worker thread only (the memory manager calls
:func:`load_embedding_model`; the job body calls ``embed``), so MLX never sees two threads.

Architectures come from ``mlx-embeddings`` (``mlx_embeddings.models.<model_type>``: ``bert``,
``qwen3``, ``qwen3_vl``, ...), imported without the package's ``__init__``, which pulls in
mlx-vlm and transformers (~700 MiB of RSS): a text model costs only MLX and ``tokenizers``.
Nothing here downloads anything; the folder comes from :func:`kiapi.runtime.weights.locate`.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kiapi.runtime import blas
from kiapi.runtime.embedding import EmbeddingItem, EmbeddingVector
from kiapi.runtime.registry import LoadedModel, ModelSpec
from kiapi.runtime.weights import locate, read_json, weight_files

MEAN, LAST = "mean", "last"
GIB = 1024**3


def import_mlx() -> ModuleType:
    """``mlx.core``, imported after the optimized BLAS is loaded (the only way kiapi imports it)."""
    blas.activate()  # a no-op after the first call; must precede the first import of mlx.core
    import mlx.core as mx

    return mx


def architecture(model_type: str) -> ModuleType:
    """``mlx_embeddings.models.<model_type>``, imported without ``mlx_embeddings/__init__``.

    The package's ``__init__`` imports its loading utilities, which import mlx-vlm and
    transformers. When nothing has imported the package yet, it is registered as a bare package
    (its real ``__path__``, no ``__init__`` code) so that only the architecture module and its
    own imports load.
    """
    import_mlx()
    if "mlx_embeddings" not in sys.modules:
        found = importlib.util.find_spec("mlx_embeddings")
        if found is None or not found.submodule_search_locations:
            raise ModuleNotFoundError("mlx-embeddings is not installed (run scripts/setup.sh)")
        bare = importlib.machinery.ModuleSpec("mlx_embeddings", None, is_package=True)
        package = importlib.util.module_from_spec(bare)
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["mlx_embeddings"] = package
    return importlib.import_module(f"mlx_embeddings.models.{model_type.replace('-', '_')}")


def quantization_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """The MLX quantization a converted checkpoint was saved with (mlx-lm's config keys)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict) and "bits" in q and "group_size" in q:
            return q
    return None


def load_text_model(folder: Path, config: dict[str, Any]):
    """Build the architecture and load every weight of the checkpoint (strictly: a missing or
    unexpected tensor is an error, so a name mismatch can never leave random weights)."""
    mx = import_mlx()
    import mlx.nn as nn

    arch = architecture(config["model_type"])
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights: dict[str, Any] = {}
    for path in weight_files(folder):
        weights.update(mx.load(str(path)))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if (q := quantization_of(config)) is not None:
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()  # dropout off
    return model


def parameter_gb(model) -> float:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(model.parameters())) / GIB


def max_tokens_of(folder: Path, config: dict[str, Any]) -> int:
    """The longest input the model embeds; longer inputs are truncated to it.

    sentence-transformers' ``max_seq_length`` wins when present (all-MiniLM-L6-v2: 256, as
    sentence-transformers truncates); then the tokenizer's ``model_max_length``; never more
    than the position embeddings allow.
    """
    limits = [config.get("max_position_embeddings")]
    limits.append(read_json(folder, "sentence_bert_config.json").get("max_seq_length"))
    if not limits[-1]:
        limits.append(read_json(folder, "tokenizer_config.json").get("model_max_length"))
    usable = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 10**7]
    if not usable:
        raise ValueError(f"{folder}: cannot tell the model's maximum sequence length")
    return min(usable)


class _Embedder:
    """What both engines share: the loaded MLX model, its measured weight, and unloading."""

    def __init__(self, model) -> None:
        self.model = model
        self.weight_gb = parameter_gb(model)

    def unload(self) -> None:
        """Drop the weights and return MLX's cached buffers (worker thread)."""
        self.model = None
        gc.collect()
        import_mlx().clear_cache()


class TextEmbedder(_Embedder):
    """A text embedding model: ``tokenizers`` + an mlx-embeddings architecture + pooling.

    Inputs are truncated to ``max_tokens``; a batch is right-padded and masked. Pooling is
    ``mean`` over the unmasked tokens (sentence-transformers' mean pooling) or ``last``: the
    last unmasked token, which for last-token models must be the end-of-text token (appended
    if the tokenizer does not add it, as the Qwen3-Embedding paper and tokenizer do).
    """

    def __init__(self, model, tokenizer, *, pooling: str, max_tokens: int, eos_id: int | None):
        if pooling not in (MEAN, LAST):
            raise ValueError(f"unknown pooling {pooling!r}")
        super().__init__(model)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.eos_id = eos_id if pooling == LAST else None

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], *, pooling: str) -> TextEmbedder:
        from tokenizers import Tokenizer

        max_tokens = max_tokens_of(folder, config)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()  # some shipped tokenizer.json files pad everything to 128
        tokenizer.enable_truncation(max_tokens)
        eos = config.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) and eos else eos
        model = load_text_model(folder, config)
        return cls(model, tokenizer, pooling=pooling, max_tokens=max_tokens, eos_id=eos_id)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        batch = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        if self.eos_id is not None:
            batch = [
                ids
                if ids and ids[-1] == self.eos_id
                else [*ids[: self.max_tokens - 1], self.eos_id]
                for ids in batch
            ]
        return batch

    def embed(self, items: Sequence[EmbeddingItem]) -> list[EmbeddingVector]:
        mx = import_mlx()
        batch = self.token_ids([item.text or "" for item in items])
        width = max(len(ids) for ids in batch)
        input_ids = mx.array([ids + [0] * (width - len(ids)) for ids in batch], dtype=mx.int32)
        mask = mx.array([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        hidden = self.model(input_ids, attention_mask=mask).last_hidden_state.astype(mx.float32)
        if self.pooling == MEAN:
            weights = mask[..., None].astype(mx.float32)
            pooled = (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)
        else:
            pooled = hidden[mx.arange(len(batch)), mask.sum(axis=1) - 1]
        vectors = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return [
            EmbeddingVector(vector=v, prompt_tokens=len(ids))
            for v, ids in zip(np.array(vectors), batch, strict=True)
        ]


class VisionLanguageEmbedder(_Embedder):
    """Qwen3-VL embedding: the mlx-embeddings model and its processor (transformers), as is.

    Text, an image, or both in one item give one fused vector: the processor formats the item
    with the model's chat template, the model pools the last non-padding token and normalises.
    """

    def __init__(self, model, processor):
        super().__init__(model)
        self.processor = processor

    @classmethod
    def load(cls, folder: Path) -> VisionLanguageEmbedder:
        architecture("qwen3_vl")
        from mlx_embeddings.models.qwen3_vl import Processor
        from mlx_embeddings.utils import load_model

        model = load_model(folder, path_to_repo=str(folder))
        return cls(model, Processor.from_pretrained(folder))

    def embed(self, items: Sequence[EmbeddingItem]) -> list[EmbeddingVector]:
        inputs = self.processor.prepare_embedding_inputs(
            [{"text": item.text, "image": item.image} for item in items]
        )
        # The language model caches position ids for generation and mlx-embeddings reuses them
        # for text-only inputs: a previous call's batch would leak into this one.
        self.model.language_model._position_ids = None
        self.model.language_model._rope_deltas = None
        vectors = self.model(**inputs).text_embeds.astype(import_mlx().float32)
        tokens = inputs["attention_mask"].sum(axis=1).tolist()
        return [
            EmbeddingVector(vector=v, prompt_tokens=int(n))
            for v, n in zip(np.array(vectors), tokens, strict=True)
        ]


def load_embedding_model(spec: ModelSpec) -> LoadedModel:
    """The catalog's loader for embedding models (worker thread)."""
    folder = locate(spec.name, spec.source)
    config = read_json(folder, "config.json")
    if "vision_config" in config:
        embedder: TextEmbedder | VisionLanguageEmbedder = VisionLanguageEmbedder.load(folder)
    else:
        embedder = TextEmbedder.load(folder, config, pooling=spec.pooling or MEAN)
    # One forward pass before the model counts as loaded: MLX compiles some kernels (GELU) with
    # g++ on first use, ~0.9 s on a machine with no cache yet, which no request should pay.
    embedder.embed([EmbeddingItem(text="warm up")])
    return LoadedModel(model=embedder, weight_gb=embedder.weight_gb, unload=embedder.unload)


def sgemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul speed of MLX on the CPU (what the active BLAS delivers)."""
    mx = import_mlx()
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    started = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def describe_device() -> str:
    mx = import_mlx()
    return f"mlx {mx.__version__}, default device {mx.default_device()}"
