"""The chat engine: decoder language models on mlx-lm, and the continuous batch that runs them.

The only chat module that imports MLX (lazily, inside functions), like ``mlx_engine`` for
embeddings. Two ways in:

* :func:`load_gguf` reads a llama-architecture GGUF file with ``mx.load`` (MLX turns the
  Q4_0/Q4_1/Q8_0 blocks into its own quantized tensors, group size 32, and hands over the
  metadata): mlx-lm's ``llama.Model`` with ``rope_traditional=True`` (GGUF stores Q and K
  rows in the interleaved order the traditional rotation expects), the tensors renamed and
  each linear layer quantized with the bits its tensors have, and a byte-level BPE tokenizer
  built with ``tokenizers`` from the file's vocabulary and merges. The chat template is the
  file's ``tokenizer.chat_template``.
* :func:`load_hf` loads a Hugging Face-layout MLX folder through mlx-lm's own loader
  (``mlx_lm.utils.load``); the template comes from its ``tokenizer_config.json`` (or
  ``chat_template.jinja``).

:class:`Generator` owns one model's :class:`mlx_lm.generate.BatchGenerator`: sequences are
inserted between decode steps and leave when they finish or are removed, so concurrent
requests share every decode step (continuous batching). Only the worker thread calls it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiapi.runtime import cpu_decoder
from kiapi.runtime.mlx_import import import_mlx
from kiapi.runtime.mlx_quantized import dequantized_float32, float_linear_weight
from kiapi.runtime.registry import LoadedModel, ModelSpec
from kiapi.runtime.weights import locate, read_json

log = logging.getLogger(__name__)

_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases)$")
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
GGUF_GROUP_SIZE = 32  # every GGUF block type MLX reads (Q4_0, Q4_1, Q8_0) has 32 weights
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens (<|im_start|>, ...)


@dataclass
class ChatModel:
    """A loaded chat model: what the request side needs (tokenizer, template, limits) and
    what the worker runs (``model``). ``encode``/``decode``/``render`` are safe on any thread
    (``tokenizers`` and jinja2 release nothing shared); ``model`` belongs to the worker."""

    name: str
    model: Any
    tokenizer: Any  # a ``tokenizers.Tokenizer``
    template: Any  # a compiled jinja2 template
    special_tokens: dict[str, str]  # bos_token, eos_token as the template knows them
    stop_ids: frozenset[int]
    context_length: int
    kv_bytes_per_token: int
    weight_layout: str = "as loaded"  # on the CPU: packed, rows or columns (dequantize_for_cpu)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        return self.template.render(
            messages=list(messages), add_generation_prompt=True, **self.special_tokens
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def compile_template(source: str):
    """A chat template as transformers runs it: a sandbox (the template comes from a model
    file), trimmed blocks, and its ``raise_exception`` helper."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


# -- GGUF ----------------------------------------------------------------------------------
def gguf_tensor_name(name: str) -> str:
    """mlx-lm's name for a GGUF tensor (``blk.3.attn_q.scales`` ->
    ``model.layers.3.self_attn.q_proj.scales``)."""
    match = _GGUF_LAYER.match(name)
    if match:
        return f"model.layers.{match[1]}.{_GGUF_LAYER_NAMES[match[2]]}.{match[3]}"
    base, leaf = name.rsplit(".", 1)
    if base not in _GGUF_TOP_NAMES:
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"{_GGUF_TOP_NAMES[base]}.{leaf}"


def load_gguf(path: Path, name: str = "gguf", layout: str | None = None) -> ChatModel:
    """A llama-architecture GGUF file as a :class:`ChatModel` (worker thread); ``layout``
    as :func:`dequantize_for_cpu` takes it (None: measured)."""
    mx = import_mlx()
    import mlx.nn as nn
    from mlx_lm.models import llama

    tensors, meta = mx.load(str(path), return_metadata=True)
    arch = str(meta.get("general.architecture", ""))
    if arch != "llama":
        raise ValueError(f"{path.name}: GGUF architecture {arch!r}; kiapi reads llama only")

    def number(key: str) -> Any:
        return meta[f"llama.{key}"].item()

    weights = {gguf_tensor_name(k): v for k, v in tensors.items()}
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=number("embedding_length"),
        num_hidden_layers=number("block_count"),
        intermediate_size=number("feed_forward_length"),
        num_attention_heads=number("attention.head_count"),
        num_key_value_heads=number("attention.head_count_kv"),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
        vocab_size=number("vocab_size"),
        rope_theta=number("rope.freq_base"),
        rope_traditional=True,
        tie_word_embeddings="lm_head.weight" not in weights,
        max_position_embeddings=number("context_length"),
    )
    model = llama.Model(args)

    def quantization(layer_path: str, _module: Any) -> dict[str, int] | bool:
        scales = weights.get(f"{layer_path}.scales")
        if scales is None:
            return False
        inputs = scales.shape[-1] * GGUF_GROUP_SIZE
        bits = weights[f"{layer_path}.weight"].shape[-1] * 32 // inputs
        return {"group_size": GGUF_GROUP_SIZE, "bits": bits}

    nn.quantize(model, class_predicate=quantization)
    model.load_weights(list(weights.items()), strict=True)
    on_cpu = mx.default_device() == mx.cpu
    layout = dequantize_for_cpu(model, layout) if on_cpu else "as loaded"
    if on_cpu:
        cpu_decoder.install_attention(type(model).__module__)
    mx.eval(model.parameters())

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta["tokenizer.ggml.token_type"].tolist()
    tokenizer = gguf_tokenizer(
        tokens, list(meta["tokenizer.ggml.merges"]), types, str(meta["tokenizer.ggml.pre"])
    )
    eos = int(meta["tokenizer.ggml.eos_token_id"].item())
    bos = int(meta["tokenizer.ggml.bos_token_id"].item())
    template = meta.get("tokenizer.chat_template")
    if template is None:
        raise ValueError(f"{path.name} has no tokenizer.chat_template")
    return ChatModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        template=compile_template(str(template)),
        special_tokens={"bos_token": tokens[bos], "eos_token": tokens[eos]},
        stop_ids=frozenset({eos}),
        context_length=args.max_position_embeddings,
        kv_bytes_per_token=kv_bytes_per_token(
            args.num_hidden_layers,
            args.num_key_value_heads,
            args.head_dim or args.hidden_size // args.num_attention_heads,
        ),
        weight_layout=layout,
    )


LAYOUTS = ("packed", "rows", "columns")
COLUMNS_MARGIN = 0.9  # columns is kept only when it takes < 90% of the time rows takes
PACKED_MARGIN = 0.8  # float32 replaces packed weights only when it takes < 80% of their time
LAYOUT_SAMPLE_BYTES = 192 * 2**20  # well past any L3 cache here: decoding streams its weights


def dequantize_for_cpu(model: Any, layout: str | None = None, timer=None) -> str:
    """Quantized layers -> layers MLX's CPU backend multiplies fast, in place; returns the
    layout the matrices got.

    MLX's CPU backend has no fast quantized matmul (one scalar at a time, one thread: 80-136
    ms of products per SmolLM2 token, ``bench/decode_profile.py``). Two ways around it:

    * ``packed``: the weights stay as stored, 4 or 8 bits, and kiapi's own kernel multiplies
      them (:mod:`kiapi.runtime.qmatmul`, compiled for this machine at first use): SmolLM2's
      products read 81 MB per token instead of 538, and the model holds 4-7x less memory.
      Only when the kernel is available and handles every layer's bits and group size.
      SwiGLU MLPs then become :class:`kiapi.runtime.cpu_decoder.PackedMLP` (the activation
      in the kernel too, between the two products, on NumPy buffers).
    * float32, expanded once: decoding streams 4-8x the memory through the BLAS, and which
      storage OpenBLAS streams faster depends on the CPU: ``rows`` keeps ``nn.Linear``'s
      (outputs, inputs) matrices (``x @ W.T``; faster on an AMD EPYC), ``columns`` stores them
      transposed (:class:`ColumnMajorLinear`, ``x @ Wt``; faster on a Cooper Lake Xeon).

    ``layout=None`` measures the candidates on the model's own first matrices
    (:func:`faster_layout`: 5 rounds over 192 MiB of float32) and keeps the fastest, packed
    unless a float32 layout is clearly faster (it also costs 4-8x the memory). On a GPU
    (Metal) the quantized kernels are the fast ones and nothing changes. A quantized
    embedding keeps its packed table for lookups; when the model ties its output head to it
    (no ``lm_head``), the head is the packed table (``packed``) or a float32 copy in the
    chosen layout (:class:`CpuEmbedding`)."""
    from kiapi.runtime import qmatmul

    import_mlx()
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    tied = "lm_head" not in model
    linears, embeddings = [], []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedEmbedding):
            embeddings.append((path, module))
        elif isinstance(module, nn.QuantizedLinear):
            linears.append((path, module))
    quantized = [module for _, module in linears + embeddings]
    packable = bool(quantized) and all(
        qmatmul.supported(m.bits, m.group_size, getattr(m, "mode", "affine")) for m in quantized
    )
    # lazy: a float32 matrix is computed only if the measurement or the layout uses it
    floats = [(path, float_linear_weight(module), module.get("bias")) for path, module in linears]
    if layout is None and not linears:  # an embedding alone: nothing to time
        layout = "packed" if packable else "rows"
    elif layout is None:
        candidates = [module for _, module in linears] if packable else None
        layout = faster_layout([w for _, w, _ in floats], timer, packed=candidates)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if layout == "packed":
        if not packable:
            raise ValueError("the packed layout needs the quantized CPU kernel for every layer")
        _, packed_embedding = qmatmul.packed_modules()
        replaced = [(path, packed_embedding(module)) for path, module in embeddings]
        replaced += qmatmul.pack_linears(linears)
    else:
        column_major_linear, cpu_embedding = cpu_modules()
        replaced = [(path, cpu_embedding(module, tied, layout)) for path, module in embeddings]
        for path, weight, bias in floats:
            replaced.append((path, column_major_linear(weight, bias) if layout == "columns"
                             else row_major_linear(weight, bias)))  # fmt: skip
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    if layout == "packed":  # SwiGLU MLPs over packed projections: one NumPy pass each
        mlps = [(path, m) for path, m in model.named_modules() if cpu_decoder.packable_mlp(m)]
        packed_mlp = cpu_decoder.packed_mlp_class()
        if mlps:
            model.update_modules(tree_unflatten([(path, packed_mlp(m)) for path, m in mlps]))
    del floats, replaced
    import_mlx().clear_cache()  # the measurement's float32 sample, when packed won
    return layout


def row_major_linear(weight: Any, bias: Any = None) -> Any:
    """An ``nn.Linear`` holding ``weight`` (outputs, inputs) as it is."""
    import mlx.nn as nn

    layer = nn.Linear(1, 1, bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def faster_layout(
    matrices: Sequence[Any], timer=None, rounds: int = 5, packed: Sequence[Any] | None = None
) -> str:
    """The storage that multiplies one row by ``matrices`` (float32, (outputs, inputs))
    fastest here: ``rows`` or ``columns``, or ``packed`` when ``packed`` gives the same
    layers as quantized modules (:class:`kiapi.runtime.qmatmul.PackedMatrix` runs them).
    Timed on the first matrices that add up to :data:`LAYOUT_SAMPLE_BYTES` of float32 (so
    they come from memory, as in a decode step); best of ``rounds`` in a row for each, packed
    first (the BLAS's threads spin for a while after a call and would slow the kernel);
    ``timer`` defaults to ``time.perf_counter``. Near-ties go to packed (less memory), then
    to rows (:data:`PACKED_MARGIN`, :data:`COLUMNS_MARGIN`)."""
    import time

    mx = import_mlx()
    timer = timer or time.perf_counter
    sample, size = [], 0
    for matrix in matrices:
        if size >= LAYOUT_SAMPLE_BYTES:
            break
        sample.append(matrix)
        size += matrix.nbytes
    transposed = [mx.contiguous(m.T) for m in sample]
    rows = {m.shape[1]: mx.ones((1, m.shape[1])) for m in sample}
    mx.eval(sample, transposed, list(rows.values()))

    def by_rows() -> None:
        mx.eval([rows[m.shape[1]] @ m.T for m in sample])

    def by_columns() -> None:
        mx.eval([rows[t.shape[0]] @ t for t in transposed])

    runners = {}
    if packed is not None:  # first: the BLAS's threads, busy-waiting after a call, slow it
        from kiapi.runtime.qmatmul import PackedMatrix

        matrices_packed = [
            PackedMatrix(q.weight, q.scales, q.biases, q.group_size, q.bits)
            for q in packed[: len(sample)]
        ]

        def by_packed() -> None:
            mx.eval([p.matmul(rows[p.inputs]) for p in matrices_packed])

        runners["packed"] = by_packed
    runners.update(rows=by_rows, columns=by_columns)
    best = dict.fromkeys(runners, float("inf"))
    for name, run in runners.items():
        for _ in range(rounds):
            started = timer()
            run()
            best[name] = min(best[name], timer() - started)
    # rows (MLX's own layout) unless columns is clearly faster: rows' advantage comes from
    # OpenBLAS splitting the product over every core, so a busy moment at load (a client
    # polling, another process) erases it from the measurement but not from serving
    log.info("layout timings: %s", {k: round(v * 1000, 1) for k, v in best.items()})
    floats = "columns" if best["columns"] < COLUMNS_MARGIN * best["rows"] else "rows"
    if "packed" in best and not best[floats] < PACKED_MARGIN * best["packed"]:
        return "packed"
    return floats


@functools.cache
def cpu_modules() -> tuple[type, type]:
    """``(ColumnMajorLinear, CpuEmbedding)``, defined once MLX is imported (lazily)."""
    mx = import_mlx()
    import mlx.nn as nn

    class ColumnMajorLinear(nn.Module):
        """``x @ W.T + b`` with ``W.T`` stored contiguous (see :func:`dequantize_for_cpu`)."""

        def __init__(self, weight: Any, bias: Any = None) -> None:
            super().__init__()
            self.weight_t = mx.contiguous(weight.T)
            if bias is not None:
                self.bias = bias

        def __call__(self, x: Any) -> Any:
            if "bias" in self:
                return mx.addmm(self.bias, x, self.weight_t)
            return x @ self.weight_t

    class CpuEmbedding(nn.Module):
        """A quantized embedding table whose looked-up rows are expanded to float32 exactly
        as :func:`dequantized_float32` expands matrices; ``as_linear`` (a tied output head)
        multiplies by a float32 copy of the table, made only when ``head`` is true: the
        table itself (``rows``, ``x @ T.T``) or its transpose (``columns``, ``x @ Tt``)."""

        def __init__(self, quantized: Any, head: bool, layout: str = "rows") -> None:
            super().__init__()
            self.weight, self.scales = quantized.weight, quantized.scales
            self.biases = quantized.biases
            self.group_size, self.bits = quantized.group_size, quantized.bits
            if head:
                table = dequantized_float32(
                    self.weight, self.scales, self.biases, self.group_size, self.bits
                )
                if layout == "columns":
                    self.head_t = mx.contiguous(table.T)
                else:
                    self.head = table

        def __call__(self, ids: Any) -> Any:
            return dequantized_float32(
                self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits
            )

        def as_linear(self, x: Any) -> Any:
            if "head_t" in self:
                return x @ self.head_t
            return x @ self.head.T

    return ColumnMajorLinear, CpuEmbedding


def gguf_tokenizer(tokens: list[str], merges: list[str], types: list[int], pre: str):
    """The byte-level BPE tokenizer of a GGUF file (``tokenizer.ggml.model == "gpt2"``).

    ``pre`` names llama.cpp's pre-tokenizer; ``smollm`` (and the other gpt2-regex families)
    split digits one by one before the GPT-2 byte-level regex, as the Hugging Face
    tokenizer.json of those models does. Control tokens are special (never split, never
    merged)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "gpt2"):
        steps = [byte_level] if pre == "gpt2" else [pre_tokenizers.Digits(True), byte_level]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind == CONTROL_TOKEN
        ]
    )
    return tokenizer


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int) -> int:
    """KV-cache bytes one token costs: keys and values of every layer, float32 on the CPU."""
    return 2 * layers * kv_heads * head_dim * 4


# -- Hugging Face layout (mlx-community) ---------------------------------------------------
def load_hf(folder: Path, name: str = "hf") -> ChatModel:
    """An MLX model folder in the Hugging Face layout: the model through mlx-lm's loader
    (``load_model``: weights, quantization, architecture), the tokenizer with ``tokenizers``
    and the template from ``tokenizer_config.json`` or ``chat_template.jinja``."""
    mx = import_mlx()
    from mlx_lm.utils import load_model
    from tokenizers import Tokenizer

    model, config = load_model(folder)
    layout = "as loaded"
    if mx.default_device() == mx.cpu:
        layout = dequantize_for_cpu(model)
        mx.eval(model.parameters())
        cpu_decoder.install_attention(type(model).__module__)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer_config = read_json(folder, "tokenizer_config.json")
    source = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if source is None and jinja.exists():
        source = jinja.read_text()
    if source is None:
        raise ValueError(f"{folder} has no chat template (tokenizer_config.json)")
    special = {key: _token_text(tokenizer_config.get(key)) for key in ("bos_token", "eos_token")}
    eos = config.get("eos_token_id")
    stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if (end := tokenizer.token_to_id(special["eos_token"])) is not None:
        stop_ids.add(end)  # the template's end of turn, where config names another token
    heads = config["num_attention_heads"]
    return ChatModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        template=compile_template(source),
        special_tokens=special,
        stop_ids=frozenset(stop_ids),
        context_length=int(config.get("max_position_embeddings", 4096)),
        kv_bytes_per_token=kv_bytes_per_token(
            config["num_hidden_layers"],
            config.get("num_key_value_heads", heads),
            config.get("head_dim") or config["hidden_size"] // heads,
        ),
        weight_layout=layout,
    )


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content") or ""
    return value or ""


# -- loaders for the catalog ---------------------------------------------------------------
def load_chat_model(spec: ModelSpec) -> LoadedModel:
    """The catalog's chat loader: a GGUF file (``source.filename``) or an HF-layout folder."""
    mx = import_mlx()

    folder = locate(spec.name, spec.source)
    filename = spec.source.filename if spec.source else None
    before = mx.get_active_memory()
    chat = load_gguf(folder / filename, spec.name) if filename else load_hf(folder, spec.name)
    weight_gb = max(mx.get_active_memory() - before, 0) / 1e9
    log.info("loaded %s: %.2f GB, weights stored by %s", spec.name, weight_gb, chat.weight_layout)

    def unload() -> None:
        chat.model = None
        mx.clear_cache()

    return LoadedModel(chat, weight_gb or spec.weight_gb, unload)


# -- the continuous batch -------------------------------------------------------------------
@dataclass
class Sampling:
    """How one sequence picks its tokens: ``temperature`` 0 is greedy (deterministic);
    otherwise top-p sampling from a PRNG seeded with ``seed`` (same seed, same tokens)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def make_sampler(sampling: Sampling) -> Callable[[Any], Any]:
    """A per-sequence sampler over log-probabilities ``(1, vocab)``; it owns its PRNG key."""
    mx = import_mlx()

    if sampling.temperature <= 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = [mx.random.key(sampling.seed if sampling.seed is not None else _fresh_seed())]
    inverse_t = 1.0 / sampling.temperature
    top_p = sampling.top_p

    def sample(logprobs):
        key[0], step_key = mx.random.split(key[0])
        logits = logprobs * inverse_t
        if top_p < 1.0:
            probs = mx.softmax(logits, axis=-1)
            order = mx.argsort(-probs, axis=-1)
            sorted_probs = mx.take_along_axis(probs, order, axis=-1)
            cumulative = mx.cumsum(sorted_probs, axis=-1)
            keep_sorted = (cumulative - sorted_probs) < top_p  # always keeps the top token
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            logits = mx.where(keep, logits, -float("inf"))
        return mx.random.categorical(logits, key=step_key)

    return sample


def _fresh_seed() -> int:
    import secrets

    return secrets.randbits(32)


@dataclass
class Step:
    """One sequence's token from one decode step (``finish``: ``stop``/``length`` or None)."""

    uid: int
    token: int
    finish: str | None


@functools.cache
def tokens_first_generation_batch() -> type:
    """mlx-lm's ``GenerationBatch`` (private, pinned below 0.33), returning each step's tokens
    as soon as they are sampled, installed in ``mlx_lm.generate`` (where ``BatchGenerator``
    and ``PromptProcessingBatch`` look the class up).

    mlx-lm pipelines: a step feeds the tokens sampled last, starts the next forward pass
    asynchronously and returns the tokens it fed, and a new batch runs one step while it is
    built. That hides the host's work behind MLX's lazy evaluation, but kiapi's products are
    eager (its kernel runs when the layer is called), so every token waited for the forward
    pass of the next one: the first token came after two decode steps past the prompt, not
    one (~27 ms more TTFT at batch 1 here, by hand). Here a step is one forward pass, of the
    tokens fed last, and returns the tokens it samples. ``self.tokens`` (the tokens in the
    KV cache) stays as mlx-lm defines it; a sequence that stops is dropped without feeding its
    stop token (one forward pass fewer). ``tests/unit/test_chat_reference.py`` checks the
    seam."""
    import importlib

    import_mlx()
    # the module (``mlx_lm.generate`` the attribute is mlx-lm's generate function)
    generate = importlib.import_module("mlx_lm.generate")
    base = generate.GenerationBatch
    if getattr(base, "kiapi_tokens_first", False):
        return base

    class TokensFirstGenerationBatch(base):
        kiapi_tokens_first = True

        def __init__(self, *args, **kwargs) -> None:
            self._constructing = True  # mlx-lm's constructor steps once: not here
            super().__init__(*args, **kwargs)
            self._constructing = False
            # what that step would have left: one (not yet computed) logprobs entry per
            # sequence, for filter() and extend() (a sequence removed before the next step),
            # and the tokens to feed as the sampler's dtype
            self._next_logprobs = [None] * len(self.uids)
            if self._next_tokens is not None:
                self._next_tokens = self._next_tokens.astype(import_mlx().uint32)

        def _step(self):
            if self._constructing:
                return [], []
            super()._step()  # feeds _next_tokens (one forward pass), samples the next ones
            import_mlx().eval(self._next_tokens, self._next_logprobs)
            return self._next_tokens.tolist(), self._next_logprobs

    generate.GenerationBatch = TokensFirstGenerationBatch
    return TokensFirstGenerationBatch


class Generator:
    """One model's continuous batch. Worker thread only.

    ``add`` queues a tokenized prompt (prefill runs inside the next :meth:`step` calls);
    :meth:`step` advances every sequence by one decode step and returns each one's token;
    :meth:`remove` drops a sequence at once (cancel, client gone)."""

    def __init__(self, chat: ChatModel, *, completion_batch_size: int = 32) -> None:
        import_mlx()
        from mlx_lm.generate import BatchGenerator

        tokens_first_generation_batch()
        self.chat = chat
        self._batch = BatchGenerator(
            chat.model,
            stop_tokens=[[token] for token in sorted(chat.stop_ids)],
            completion_batch_size=completion_batch_size,
            prefill_batch_size=8,
            prefill_step_size=512,
        )
        self.active: set[int] = set()

    def add(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> int:
        (uid,) = self._batch.insert(
            [list(prompt)], max_tokens=[max_tokens], samplers=[make_sampler(sampling)]
        )
        self.active.add(uid)
        return uid

    def step(self) -> list[Step]:
        steps = []
        for response in self._batch.next_generated():
            finish = response.finish_reason
            steps.append(Step(response.uid, int(response.token), finish))
            if finish is not None:
                self.active.discard(response.uid)
        return steps

    def remove(self, uid: int) -> None:
        if uid in self.active:
            self._batch.remove([uid])
            self.active.discard(uid)

    def close(self) -> None:
        self._batch.close()
