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
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kiapi.runtime import blas, heap, pinned, qmatmul
from kiapi.runtime.detect import POOLING_MODES
from kiapi.runtime.embedding import EmbeddingItem, EmbeddingVector
from kiapi.runtime.errors import BadRequest
from kiapi.runtime.jobs import report_progress
from kiapi.runtime.mlx_import import import_mlx
from kiapi.runtime.mlx_quantized import float_linear_weight
from kiapi.runtime.registry import LoadedModel, ModelSpec
from kiapi.runtime.weights import locate, read_json, weight_files

MEAN, LAST, MAX, CLS = "mean", "last", "max", "cls"
POOLINGS = POOLING_MODES  # what catalog entries and detection may name
GIB = 1024**3


def architecture(model_type: str) -> ModuleType:
    """``mlx_embeddings.models.<model_type>``, imported without ``mlx_embeddings/__init__``.

    The package's ``__init__`` imports its loading utilities, which import mlx-vlm and
    transformers. When nothing has imported the package yet, it is registered as a bare package
    (its real ``__path__``, no ``__init__`` code) so that only the architecture module and its
    own imports load.
    """
    import_mlx()
    if "mlx_embeddings" not in sys.modules:
        found = pinned.package_folder("mlx_embeddings")
        if found is None:
            raise ModuleNotFoundError("mlx-embeddings is not set up (run `kiapi setup`)")
        bare = importlib.machinery.ModuleSpec("mlx_embeddings", None, is_package=True)
        package = importlib.util.module_from_spec(bare)
        package.__path__ = [str(found)]
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


PREFIX_CHARS_PER_TOKEN = 32  # far above any tokenizer's mean (~4 for English, ~1 for CJK)


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

    Inputs are truncated to ``max_tokens`` unless an item asks not to be (then a longer
    input is that item's 400); a batch is right-padded and masked. Pooling, as
    sentence-transformers computes it: ``mean`` over the unmasked tokens, ``max`` over them,
    ``cls`` (the first token) or ``last``: the last unmasked token, which for last-token
    models must be the end-of-text token (appended if the tokenizer does not add it, as the
    Qwen3-Embedding paper and tokenizer do). Vectors come back as pooled; the job normalizes.
    """

    def __init__(self, model, tokenizer, *, pooling: str, max_tokens: int, eos_id: int | None):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; one of {', '.join(POOLINGS)}")
        super().__init__(model)
        self.tokenizer = tokenizer
        self.counter = None  # an untruncated copy of the tokenizer, made on first need
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.eos_id = eos_id if pooling == LAST else None
        self.kind = type(model).__module__.rsplit(".", 1)[-1]
        self.fast = FastBert(model) if fast_bert_applies(model) else None
        if self.fast is not None:
            self.weight_gb += self.fast.extra_bytes() / GIB  # fused QKV (and float copies)

    def unload(self) -> None:
        self.fast = None  # it holds weight arrays too
        super().unload()

    @classmethod
    def load(
        cls, folder: Path, config: dict[str, Any], *, pooling: str, max_tokens: int | None = None
    ) -> TextEmbedder:
        from tokenizers import Tokenizer

        limit = max_tokens_of(folder, config)
        max_tokens = min(max_tokens, limit) if max_tokens else limit
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()  # some shipped tokenizer.json files pad everything to 128
        tokenizer.enable_truncation(max_tokens)
        eos = config.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) and eos else eos
        model = load_text_model(folder, config)
        return cls(model, tokenizer, pooling=pooling, max_tokens=max_tokens, eos_id=eos_id)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_tokens``. Each text is first cut to
        ``max_tokens * PREFIX_CHARS_PER_TOKEN`` characters: tokenising a 16 MB text whole
        took 33 s of the worker; what lies past the prefix would be truncated anyway."""
        prefix = self.max_tokens * PREFIX_CHARS_PER_TOKEN
        # without character offsets: 3.2 ms instead of 4.0 for 32 x 128 tokens (by hand)
        batch = [e.ids for e in self.tokenizer.encode_batch_fast([t[:prefix] for t in texts])]
        if self.eos_id is not None:
            batch = [
                ids
                if ids and ids[-1] == self.eos_id
                else [*ids[: self.max_tokens - 1], self.eos_id]
                for ids in batch
            ]
        return batch

    def too_long(self, item: EmbeddingItem) -> BadRequest | None:
        """For an item sent with ``truncate: false``: the 400 if its tokens (with the
        end-of-text token a last-token model appends) exceed ``max_tokens``. A text longer
        than :meth:`token_ids`' prefix is counted whole only if its prefix fits: otherwise
        the prefix's count is a lower bound, and the answer is a refusal either way."""
        if item.truncate or not item.text:
            return None
        from tokenizers import Tokenizer

        if self.counter is None:
            self.counter = Tokenizer.from_str(self.tokenizer.to_str())
            self.counter.no_truncation()
        prefix = self.max_tokens * PREFIX_CHARS_PER_TOKEN
        ids = self.counter.encode(item.text[:prefix]).ids
        exact = len(item.text) <= prefix
        if not exact and len(ids) <= self.max_tokens:
            ids, exact = self.counter.encode(item.text).ids, True
        count = len(ids) + int(self.eos_id is not None and (not ids or ids[-1] != self.eos_id))
        if count <= self.max_tokens:
            return None
        return BadRequest(
            f"the input has {count if exact else f'at least {count}'} tokens but the model's "
            f"limit is {self.max_tokens}; shorten it, or send truncate: true to embed its first "
            f"{self.max_tokens} tokens",
            param="truncate",
        )

    def embed(self, items: Sequence[EmbeddingItem]) -> list[EmbeddingVector | Exception]:
        """Vectors in input order; an item sent with ``truncate: false`` that is too long
        gets its 400 in its place. Items are sorted by token count and run in length groups
        (:func:`length_groups`), so a short text never pays for a long one's padding."""
        refused = [self.too_long(item) for item in items]
        vectors: list[EmbeddingVector | Exception | None] = list(refused)
        kept = [i for i, error in enumerate(refused) if error is None]
        texts = self.token_ids([items[i].text or "" for i in kept])
        batch: list[list[int]] = [[] for _ in items]
        for index, ids in zip(kept, texts, strict=True):
            batch[index] = ids
        order = sorted(kept, key=lambda i: len(batch[i]))
        padded = 0
        for group in length_groups([len(batch[i]) for i in order]):
            members = [order[i] for i in group]
            pooled = self._embed_group([batch[i] for i in members])
            padded += len(members) * len(batch[members[-1]])  # sorted: the last is the longest
            for index, vector in zip(members, pooled, strict=True):
                vectors[index] = EmbeddingVector(vector=vector, prompt_tokens=len(batch[index]))
        release_memory(padded)
        return vectors  # type: ignore[return-value]

    def _embed_group(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass over right-padded token ids; pooled vectors, one row per input,
        in memory of their own. The bfloat16 encoder's hidden states are NumPy and pooled by
        NumPy (with float32 embedding tables, no MLX evaluation in the batch); any other
        forward pass's are MLX's and pooled by MLX."""
        width = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), width), dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.int32)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        if self.fast is not None and self.fast.bf16:
            # a copy: the hidden states are the worker's buffer, and CLS pooling is a view
            return np.array(pool(np, self.fast.hidden_states(ids, mask), mask, self.pooling))
        mx = import_mlx()
        attention_mask = mx.array(mask)
        hidden = self.encode(mx.array(ids), attention_mask).astype(mx.float32)
        return np.array(pool(mx, hidden, attention_mask, self.pooling))

    def encode(self, input_ids, attention_mask):
        """Last hidden states (batch, tokens, hidden): the fast CPU encoder when the model has
        one (:class:`FastBert`), else the architecture's own forward pass."""
        if self.fast is not None:
            return self.fast(input_ids, attention_mask)
        if self.kind == "modernbert":  # its Model pools; its encoder gives the hidden states
            out = self.model.model(input_ids, attention_mask=attention_mask, return_dict=True)
            return out["last_hidden_state"]
        return self.model(input_ids, attention_mask=attention_mask).last_hidden_state


def pool(xp: Any, hidden: Any, mask: Any, pooling: str) -> Any:
    """One vector per text from float32 hidden states (texts, tokens, width) and the 0/1
    ``mask`` of real tokens, with ``xp`` NumPy or ``mlx.core`` (the same operations in both)."""
    weights = mask[..., None].astype(xp.float32)
    if pooling == MEAN:
        return (hidden * weights).sum(axis=1) / xp.maximum(weights.sum(axis=1), 1e-9)
    if pooling == MAX:  # padding set to -1e9 first, as sentence-transformers does
        return xp.where(weights > 0, hidden, -1e9).max(axis=1)
    if pooling == CLS:
        return hidden[:, 0]
    return hidden[xp.arange(hidden.shape[0]), mask.sum(axis=1) - 1]  # LAST


KEPT_CACHE_BYTES = 64 * 1024**2
KEPT_SCRATCH_BYTES = 128 * 1024**2  # the kernel's work buffers kept between calls
TRIM_HEAP_TOKENS = 2048  # padded tokens in one call from which the C heap is trimmed after it


def release_memory(padded_tokens: int) -> None:
    """Return memory a large call left behind (worker thread, between calls).

    * MLX's cache of freed buffers is cleared when it holds more than 64 MiB.
    * The kernel's work buffers (a batch's layer intermediates, reused by the next batch) are
      dropped when they hold more than 128 MiB: a 32 x 128-token MiniLM batch keeps its ~80
      MiB, a larger one does not outlive its call (a worker busy with chat never goes quiet).
    * After a call of ``TRIM_HEAP_TOKENS`` padded tokens or more, glibc's ``malloc_trim``
      hands freed heap pages back: MLX's stream threads allocate mid-size buffers from glibc
      arenas that keep them. Measured by hand: two batches of 32 texts of 256 tokens took a
      process from 175 to 510 MiB RSS; ``malloc_trim(0)`` brought it back to 215 MiB.
      Batches of short texts never trigger it.
    """
    mx = import_mlx()
    if mx.get_cache_memory() > KEPT_CACHE_BYTES:
        mx.clear_cache()
    qmatmul.trim_scratch(KEPT_SCRATCH_BYTES)
    if padded_tokens >= TRIM_HEAP_TOKENS:
        heap.trim()


def release_idle_memory() -> None:
    """Worker thread, once the queue has gone quiet: hand back all of MLX's cached buffers, the
    kernel's work buffers and glibc's free heap pages, so a server at rest holds only its live
    memory. Between busy periods the cache would otherwise keep up to ``KEPT_CACHE_BYTES``, the
    work buffers the last large batch's intermediates, and the heap the high-water mark of the
    last burst (request bodies, uploads, vectors). MLX is not imported for this: a server that
    never embedded has no MLX memory to give back."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()
    qmatmul.release_scratch()
    heap.trim()


PADDING_SLACK = 0.25  # a length group may pad up to 25% of its real tokens ...
PADDING_FREE_TOKENS = 256  # ... or this many tokens, whichever is more


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Split sorted (ascending) token counts into consecutive groups, one forward pass each.

    An item joins the current group unless the padding that would add (every member padded to
    its length) exceeds ``max(PADDING_SLACK * real tokens, PADDING_FREE_TOKENS)``: short texts
    stay together in one pass, a 256-token text does not make 31 short ones pad to 256.
    """
    groups: list[list[int]] = []
    real = 0
    for index, length in enumerate(lengths):
        if groups:
            count = len(groups[-1]) + 1
            padding = count * length - (real + length)
            if padding <= max(PADDING_SLACK * (real + length), PADDING_FREE_TOKENS):
                groups[-1].append(index)
                real += length
                continue
        groups.append([index])
        real = length
    return groups


# ------------------------------------------------------------------------- BERT on the CPU

# Abramowitz & Stegun 7.1.28: erf(z) = 1 - (1 + a1 z + ... + a6 z^6)^-16 for z >= 0, |err| <= 3e-7
ERF_COEFFICIENTS = (
    0.0705230784,
    0.0422820123,
    0.0092705272,
    0.0001520143,
    0.0002765672,
    0.0000430638,
)
NUMPY_SOFTMAX_MIN = 1 << 16  # attention scores from which NumPy's softmax beats MLX's
TWO_STREAM_MIN_TOKENS = 256  # padded tokens from which a batch runs in two stream halves
ENCODER_CHUNK_TOKENS = 512
"""Padded tokens (whole texts, at least one) a bfloat16 encoder layer runs on at a time: its
intermediates (at 512 tokens, 2.4 MB of q, k, v and 1.5 MB of the MLP's bfloat16 rows) stay in
the caches instead of going to memory and back between products. By hand, alternating, a
32 x 128-token MiniLM batch: the whole batch at once 121-126 ms, 512 tokens 103-111, 256
109-112, 128 126-128 (more calls), 1024 104-109."""


def _gelu(x):
    mx = import_mlx()
    a1, a2, a3, a4, a5, a6 = ERF_COEFFICIENTS
    z = mx.abs(x) * (1 / math.sqrt(2))
    p = 1 + z * (a1 + z * (a2 + z * (a3 + z * (a4 + z * (a5 + z * a6)))))
    p = p * p
    p = p * p
    p = p * p
    erf_abs = 1 - 1 / (p * p)
    return 0.5 * x * (1 + mx.where(x < 0, -erf_abs, erf_abs))


_compiled_gelu = None


def polynomial_gelu(x):
    """Exact (erf) GELU to within 3e-7 of erf, compiled by MLX into one CPU kernel.

    MLX's CPU ``erf`` runs element by element (~35 Melem/s here): exact GELU was 42-64% of a
    MiniLM layer. This polynomial compiles to straight-line arithmetic, ~8x faster.
    """
    global _compiled_gelu
    if _compiled_gelu is None:
        _compiled_gelu = import_mlx().compile(_gelu, shapeless=True)
    return _compiled_gelu(x)


def numpy_softmax(scores):
    """Softmax over the last axis, computed by NumPy (vectorised ``exp``, ~8x MLX's CPU ``exp``
    here); the scores are evaluated and read without a copy, the result copied back."""
    mx = import_mlx()
    mx.eval(scores)
    values = np.array(scores, copy=False)
    out = np.subtract(values, values.max(axis=-1, keepdims=True))
    np.exp(out, out=out)
    out /= out.sum(axis=-1, keepdims=True)
    return mx.array(out)


def fast_bert_applies(model) -> bool:
    """:class:`FastBert` serves mlx-embeddings' BERT models when MLX computes on the CPU."""
    mx = import_mlx()
    is_bert = type(model).__module__.rsplit(".", 1)[-1] == "bert"
    return is_bert and mx.default_device().type == mx.DeviceType.cpu


class FastBert:
    """The encoder of mlx-embeddings' BERT (``bert.Model``), computed faster on the CPU: same
    weights, same arithmetic up to float rounding; tests compare it with ``bert.Model``.

    What differs from ``bert.Model.__call__``:

    * query, key and value are one matmul (weights concatenated once; the 1/sqrt(head size)
      scale folded into the query weights);
    * where :func:`kiapi.runtime.qmatmul.bf16_products` holds (a CPU with AMX, the
      ``matmul_precision`` setting ``auto``) and every matrix fits the tiles, the model holds
      its matrices as bfloat16 tiles (:class:`kiapi.runtime.qmatmul.Bf16Linear`) and every
      layer runs in kiapi's kernel on NumPy buffers (:meth:`hidden_states`); the rest of
      this list is the float32 path, through MLX and the BLAS;
    * the softmax and GELU run in kiapi's kernel (:meth:`__call__`); without it (no C
      compiler) GELU uses :func:`polynomial_gelu` and large attention softmaxes
      :func:`numpy_softmax`;
    * a batch is split in halves run on ``streams`` MLX CPU streams, with the BLAS on
      ``cores // streams`` threads each: MLX's element-wise kernels use one core each, so one
      stream per core keeps every core busy;
    * the pooler (unused by mean pooling) is skipped;
    * an MLX-quantized checkpoint's matrices are expanded to float32 once
      (:func:`kiapi.runtime.mlx_quantized.float_linear_weight`).

    Only the worker thread calls it (the streams are MLX's own threads).
    """

    def __init__(
        self,
        model,
        *,
        streams: int | None = None,
        numpy_softmax_min: int = NUMPY_SOFTMAX_MIN,
        kernel: bool | None = None,
        two_stream_min_tokens: int = TWO_STREAM_MIN_TOKENS,
        bf16: bool | None = None,
    ):
        mx = import_mlx()
        config = model.config
        self.embeddings = model.embeddings
        self.eps = config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.heads
        self.numpy_softmax_min = numpy_softmax_min
        self.kernel = qmatmul.kernel() is not None if kernel is None else kernel
        self.two_stream_min_tokens = two_stream_min_tokens
        cores = qmatmul.cpu_threads()
        self.streams = [mx.new_stream(mx.cpu) for _ in range(streams or min(2, cores))]
        self.threads_per_stream = max(1, cores // len(self.streams))
        self.cores = cores
        scale = 1 / math.sqrt(self.head_size)
        self.quantized = "scales" in model.encoder.layer[0].intermediate.dense
        matrices = []  # per layer: (outputs, inputs) weight and bias of qkv, out, up, down
        for layer in model.encoder.layer:
            att = layer.attention.self
            qkv = [float_linear_weight(m) for m in (att.query, att.key, att.value)]
            matrices.append(
                {
                    "qkv": (
                        mx.concatenate([qkv[0] * scale, qkv[1], qkv[2]]),
                        mx.concatenate([att.query.bias * scale, att.key.bias, att.value.bias]),
                    ),
                    **{
                        name: (float_linear_weight(dense), dense.bias)
                        for name, dense in (
                            ("out", layer.attention.output.dense),
                            ("up", layer.intermediate.dense),
                            ("down", layer.output.dense),
                        )
                    },
                }
            )
        # bfloat16 for the whole model or not at all: every matrix must fit the tiles
        self.bf16 = (
            self.kernel
            and bf16 is not False
            and qmatmul.bf16_products()
            and all(qmatmul.bf16_shape(*w.shape) for m in matrices for w, _ in m.values())
        )
        self.layers = []
        for layer, m in zip(model.encoder.layer, matrices, strict=True):
            norms = {"norm1": layer.attention.output.LayerNorm, "norm2": layer.output.LayerNorm}
            if self.bf16:  # tiles, and the norms' weights as the kernel reads them
                params = {name: qmatmul.Bf16Linear(w, b) for name, (w, b) in m.items()}
                for name, norm in norms.items():
                    params[name] = tuple(
                        np.array(a.astype(mx.float32)) for a in (norm.weight, norm.bias)
                    )
            else:
                params = dict(norms)
                for name, (w, b) in m.items():
                    params[f"w_{name}"], params[f"b_{name}"] = w.T, b
            self.layers.append(params)
        mx.eval([{k: v for k, v in p.items() if k.startswith(("w_", "b_"))} for p in self.layers])
        self.numpy_embeddings = self._numpy_embeddings() if self.bf16 else None

    def _numpy_embeddings(self) -> tuple | None:
        """The embedding tables as NumPy views (no copy) and the embedding norm's weights, for
        the bfloat16 path's gather; None unless every table is a plain float32 one (an MLX-
        quantized table takes MLX's own lookup)."""
        mx = import_mlx()
        tables = (
            self.embeddings.word_embeddings,
            self.embeddings.position_embeddings,
            self.embeddings.token_type_embeddings,
        )
        weights = [getattr(t, "weight", None) for t in tables]
        if any(w is None or w.dtype != mx.float32 for w in weights):  # quantized: uint32
            return None
        mx.eval(weights)
        norm = self.embeddings.LayerNorm
        return (
            *(np.array(w, copy=False) for w in weights),
            *(np.array(a.astype(mx.float32)) for a in (norm.weight, norm.bias)),
        )

    def extra_bytes(self) -> int:
        """Memory it adds to the model's own weights: the bfloat16 tiles of every matrix, or
        in float32 the fused QKV weights and biases, and for an MLX-quantized model the
        float32 copies of the other matrices too (for a float one they are views of the
        model's own)."""
        copied = ("w_qkv", "b_qkv", "w_out", "w_up", "w_down") if self.quantized else (
            "w_qkv", "b_qkv")  # fmt: skip
        return sum(
            value.nbytes
            for p in self.layers
            for key, value in p.items()
            if key in copied or isinstance(value, qmatmul.Bf16Linear)
        )

    def _embedded(self, input_ids, tokens: int, hidden: int, threads: int) -> np.ndarray:
        """The embedding layer's output as float32 NumPy (tokens, hidden): word, position
        (0, 1, ...) and token type 0 rows summed and normalized, gathered by NumPy and
        normalized in the kernel (MLX's single-threaded ops took 9 ms of a 32 x 128-token
        batch, by hand); MLX's own layer where the tables are not plain float32 ones."""
        rows, width = input_ids.shape
        ids = np.array(input_ids, dtype=np.int64)
        tables = self.numpy_embeddings
        if (
            tables is None
            or width > len(tables[1])
            or not 0 <= ids.min() <= ids.max() < len(tables[0])
        ):
            # (ids and lengths outside the tables never get here from the tokenizer)
            out = np.array(self.embeddings(import_mlx().array(ids)), dtype=np.float32)
            return out.reshape(tokens, hidden)
        words, positions, types, gamma, beta = tables
        # the worker's buffer: the layers work in it, and the encoder's answer is a view of it
        x = qmatmul.scratch_rows("encoder_x", tokens, hidden)
        # ids checked above: "clip" fills x directly ("raise" buffers: 1.5 -> 0.6 ms, by hand)
        np.take(words, ids.reshape(-1), axis=0, out=x, mode="clip")
        added = np.ascontiguousarray(positions[:width] + types[0], dtype=np.float32)
        qmatmul.add_layer_norm(added, x, gamma, beta, self.eps, threads)  # added: every text
        return x

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The last hidden states (texts, tokens, hidden) of the encoder with every matrix as
        bfloat16 tiles, for NumPy token ids and 0/1 mask: a view of the worker's scratch
        buffer, valid until the worker's next encoder call (its caller reads it at once).

        After the embeddings, each layer runs on NumPy buffers through the kernel alone, on
        every core (the fused QKV product, attention reading it in place with its two products
        on AMX tiles too, the output product, residual and layer norm in one sweep, the up
        product writing GELU of its rows as the down product's bfloat16 tiles, the down
        product, residual and norm), a few texts at a time (:data:`ENCODER_CHUNK_TOKENS`), into
        the worker's reused buffers. No MLX op, no BLAS and no stream split between them:
        MLX's single-threaded element-wise ops and the evaluations between kernel calls were
        most of a batch's time (by hand, 32 x 128-token texts 474 ms -> see the README)."""
        rows, width = input_ids.shape
        heads, size = self.heads, self.head_size
        hidden, tokens, threads = heads * size, rows * width, self.cores
        x = self._embedded(input_ids, tokens, hidden, threads)
        keep = np.ascontiguousarray(
            np.broadcast_to(
                np.array(attention_mask, dtype=np.uint8)[:, None, :], (rows, width, width)
            )
        )
        # q, k and v inside the fused (B, L, 3, H, D) product; the context as (B, L, H, D)
        fused = (width * 3 * hidden, size, 3 * hidden)
        context_strides = (width * hidden, size, hidden)
        ffn = self.layers[0]["up"].outputs
        # a layer runs on a chunk of whole texts at a time, whose intermediates stay in the
        # caches, in the worker's buffers, reused by every chunk, layer and batch
        per_chunk = max(1, ENCODER_CHUNK_TOKENS // width)
        chunk = min(rows, per_chunk) * width
        qkv = qmatmul.scratch_rows("encoder_qkv", chunk, 3 * hidden)
        context = qmatmul.scratch_rows("encoder_context", chunk, hidden)
        out = qmatmul.scratch_rows("encoder_out", chunk, hidden)
        for p in self.layers:
            for first in range(0, rows, per_chunk):
                n = min(rows - first, per_chunk)
                xs = x[first * width : (first + n) * width]
                tokens_in = n * width
                qkvs, cs, outs = (b[:tokens_in] for b in (qkv, context, out))
                qmatmul.gemm_bf16(xs, p["qkv"].tiles, 3 * hidden, p["qkv"].bias, out=qkvs)
                qmatmul.attention(
                    qkvs, qkvs[:, hidden:], qkvs[:, 2 * hidden :], cs,
                    (n, heads, heads, width, width, size), fused * 3 + context_strides,
                    1.0, False, keep[first : first + n], threads, bf16=True,
                )  # fmt: skip
                qmatmul.gemm_bf16(cs, p["out"].tiles, hidden, p["out"].bias, out=outs)
                qmatmul.add_layer_norm(outs, xs, *p["norm1"], self.eps, threads)
                gelu = qmatmul.gemm_bf16_gelu_rows(xs, p["up"].tiles, ffn, p["up"].bias)
                qmatmul.gemm_bf16(gelu, p["down"].tiles, hidden, p["down"].bias, out=outs)
                qmatmul.add_layer_norm(outs, xs, *p["norm2"], self.eps, threads)
        return x.reshape(rows, width, hidden)

    def __call__(self, input_ids, attention_mask):
        """The encoder's last hidden state, evaluated. A batch of two or more rows runs in
        halves on the MLX streams (one BLAS thread each); with kiapi's kernel only from
        ``two_stream_min_tokens`` padded tokens, a smaller one on the default stream with the
        BLAS on every core (by hand, 12-token texts: 8 at once 296-359 -> 406-433 texts/s;
        at 32 the halves win, 583 -> 632). With the kernel, the softmax and GELU run in it,
        written into MLX's own buffers (MLX's CPU ``exp`` is scalar: they were 37% and 21%
        of a 32 x 128-token batch), so the halves meet there twice per layer; the kernel runs
        on one thread (on two, a 32 x 12-token batch ran at 430 texts/s instead of 656, by
        hand). Without it, the halves run unsynchronized: the softmax is MLX's (NumPy's for
        a large one on one stream) and GELU :func:`polynomial_gelu`."""
        mx = import_mlx()
        if self.bf16:
            return mx.array(self.hidden_states(np.array(input_ids), np.array(attention_mask)))
        rows, width = input_ids.shape
        heads, size = self.heads, self.head_size
        split = rows >= len(self.streams) >= 2  # every half has a row
        if self.kernel:
            split = split and rows * width >= self.two_stream_min_tokens
        streams = self.streams if split else [mx.default_stream(mx.cpu)]
        parts = []
        halves = np.array_split(np.arange(rows), len(streams))
        for stream, index in zip(streams, halves, strict=True):
            with mx.stream(stream):
                take = mx.array(index)
                mask = attention_mask[take].astype(mx.float32)
                parts.append(
                    {
                        "stream": stream,
                        "x": self.embeddings(input_ids[take]),
                        "mask": ((1.0 - mask) * -10000.0)[:, None, None, :],
                        "batch": len(index),
                    }
                )

        def softmax(scores):  # without the kernel: NumPy's for a large one on one stream
            if not split and scores.size >= self.numpy_softmax_min:
                return numpy_softmax(scores)
            return mx.softmax(scores, axis=-1)

        def each(step) -> None:  # one step of every part, each on its stream (lazy)
            for part in parts:
                with mx.stream(part["stream"]):
                    step(part)

        # the BLAS is process-wide: narrowed for this call only (a chat decode step next on
        # the worker expects every core)
        blas.set_threads(self.threads_per_stream if split else self.cores)
        try:
            for p in self.layers:

                def attention_scores(part, p=p):
                    qkv = mx.addmm(p["b_qkv"], part["x"], p["w_qkv"])
                    qkv = qkv.reshape(part["batch"], width, 3, heads, size)
                    part["qkv"] = qkv.transpose(2, 0, 3, 1, 4)
                    scores = part["qkv"][0] @ part["qkv"][1].swapaxes(-1, -2)
                    part["scores"] = scores + part["mask"]

                def up_projection(part, p=p):
                    context = (part["scores"] @ part["qkv"][2]).transpose(0, 2, 1, 3)
                    context = context.reshape(part["batch"], width, heads * size)
                    x = p["norm1"](mx.addmm(p["b_out"], context, p["w_out"]) + part["x"])
                    part["x"], part["up"] = x, mx.addmm(p["b_up"], x, p["w_up"])

                def down_projection(part, p=p):
                    down = mx.addmm(p["b_down"], part["up"], p["w_down"])
                    part["x"] = p["norm2"](down + part["x"])

                each(attention_scores)
                self._elementwise(parts, "scores", qmatmul.softmax_in_place, softmax)
                each(up_projection)
                self._elementwise(parts, "up", qmatmul.gelu_in_place, polynomial_gelu)
                each(down_projection)
            out = [part["x"] for part in parts]
            mx.eval(out)
        finally:
            blas.set_threads(self.cores)
        return out[0] if len(out) == 1 else mx.concatenate(out)

    def _elementwise(self, parts, key: str, in_place, fallback) -> None:
        """Each part's ``key`` array through the kernel's ``in_place`` function (evaluated
        first, written into its own buffer), or without the kernel ``fallback`` (lazy, on the
        part's stream)."""
        mx = import_mlx()
        if self.kernel:
            mx.eval([part[key] for part in parts])
            for part in parts:
                in_place(part[key], threads=1)
            return
        for part in parts:
            with mx.stream(part["stream"]):
                part[key] = fallback(part[key])


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
    report_progress(0.05, f"reading the weights of {spec.name} from {folder}")
    if "vision_config" in config:
        embedder: TextEmbedder | VisionLanguageEmbedder = VisionLanguageEmbedder.load(folder)
    else:
        embedder = TextEmbedder.load(
            folder, config, pooling=spec.pooling or MEAN, max_tokens=spec.max_tokens
        )
    # Forward passes before the model counts as loaded: MLX compiles some kernels (GELU) with
    # g++ on first use, ~0.9 s on a machine with no cache yet, which no request should pay.
    # One item, then two (a batch takes FastBert's two-stream path).
    report_progress(0.7, f"warming up {spec.name} (first forward passes)")
    embedder.embed([EmbeddingItem(text="warm up")])
    report_progress(0.85, f"warming up {spec.name} (a batch of two)")
    embedder.embed([EmbeddingItem(text="warm up"), EmbeddingItem(text="a batch of two")])
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
