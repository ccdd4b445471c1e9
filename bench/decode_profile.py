"""Where one SmolLM2 decode step goes on this CPU: the profile behind kiapi's chat speed.

    .venv/bin/python bench/decode_profile.py

Loads the bundled GGUF through kiapi's loader twice, with its weights packed (4/8 bits, kiapi's
quantized kernel: what the load-time measurement keeps where the kernel builds) and as float32
rows (``nn.Linear``'s layout, the fallback), and prints, per decoded token at batch 1 and 8:

* the whole step (``model(token, cache)`` and the argmax), in-process, no server, each layout;
* the matrix products alone, every weight matrix of the model (211 with the tied output head):
  through kiapi's kernel as the packed model holds them (q/k/v and gate/up stacked: 121
  products), through MLX on float32 as rows (``x @ W.T``) and as columns (``x @ Wt``), through
  MLX's own 4-bit ``quantized_matmul``, and through NumPy's BLAS ``sgemv`` on float32
  (batch 1: what the memory bandwidth allows for 538 MB);
* the packed step taken apart: the kernel's own time (products and the MLP's activation), the
  MLX ops (norms, rotary embedding, attention, the cache update), and the rest (kiapi's Python
  around the kernel, results copied into MLX, the argmax);
* a steady greedy loop over a growing cache with mlx-lm's ``BatchKVCache`` (what kiapi's
  continuous batch uses), and the prefill of a 255-token prompt, each layout.

Each table figure is the best of 3 rounds.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm2_gguf  # noqa: E402

from kiapi.runtime.mlx_import import import_mlx  # noqa: E402

PROMPT = "<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"


def best_ms(fn, repeats: int, rounds: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best * 1000


def packed_matrices(model) -> list:
    """The :class:`PackedMatrix` objects a packed model multiplies by, each once."""
    from kiapi.runtime import qmatmul

    seen: dict[int, object] = {}
    for _, module in model.named_modules():
        shared = getattr(module, "_shared", None)
        matrix = shared.matrix if shared is not None else getattr(module, "_matrix", None)
        if isinstance(matrix, qmatmul.PackedMatrix):
            seen[id(matrix)] = matrix
    return list(seen.values())


def main() -> None:
    from kiapi.config import Settings
    from kiapi.runtime import blas, qmatmul

    status = blas.activate(Settings(_env_file=None).blas)
    mx = import_mlx()
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from kiapi.runtime.llm_engine import load_gguf

    models = {layout: load_gguf(smollm2_gguf(), layout=layout) for layout in ("packed", "rows")}
    ids = models["rows"].encode(PROMPT)
    flat = tree_flatten(models["rows"].model.parameters())
    named = {
        name: a
        for name, a in flat
        if name.endswith((".weight", ".head")) and a.ndim == 2 and a.dtype == mx.float32
    }
    row_major = list(named.values())
    columns = [mx.contiguous(w.T) for w in row_major]
    packed = packed_matrices(models["packed"].model)
    mx.eval(columns)

    def step_ms(model, batch: int) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([ids] * batch), cache=cache))
        token = mx.array([[ids[-1]]] * batch)

        def one() -> None:
            logits = model(token, cache=cache)
            mx.eval(mx.argmax(logits[:, -1], axis=-1))

        return best_ms(one, 10)

    print(f"machine: {machine()}; BLAS: {status.describe()}")
    print(
        f"SmolLM2-135M-Instruct: {len(row_major)} weight matrices; packed: {len(packed)} "
        f"products (siblings stacked), {sum(m.weight.nbytes for m in packed) / 1e6:.0f} MB "
        f"packed + {sum(m.scales.nbytes * 2 for m in packed) / 1e6:.0f} MB scales and biases; "
        f"float32: {sum(w.nbytes for w in row_major) / 1e6:.0f} MB; the load-time measurement "
        f"here keeps {load_gguf(smollm2_gguf()).weight_layout}\n"
    )
    print("| per decoded token, ms | batch 1 | batch 8 |")
    print("|---|---|---|")

    def matmuls(batch: int) -> dict[str, float]:
        xs = {n: mx.random.normal((batch, n)) for n in {w.shape[1] for w in row_major}}
        quantized = [mx.quantize(w, 32, 4) for w in row_major]
        mx.eval(list(xs.values()), quantized)
        out = {
            "whole step, packed": step_ms(models["packed"].model, batch),
            "whole step, float32 rows": step_ms(models["rows"].model, batch),
            "matmuls, packed (kiapi's kernel)": best_ms(
                lambda: mx.eval([m.matmul(xs[m.inputs]) for m in packed]), 5
            ),
            "matmuls, float32 x @ W.T (rows)": best_ms(
                lambda: mx.eval([xs[w.shape[1]] @ w.T for w in row_major]), 5
            ),
            "matmuls, float32 x @ Wt (columns)": best_ms(
                lambda: mx.eval([xs[w.shape[0]] @ w for w in columns]), 5
            ),
            "matmuls, MLX 4-bit quantized_matmul": best_ms(
                lambda: mx.eval(
                    [
                        mx.quantized_matmul(xs[w.shape[1]], *q, True, 32, 4)
                        for w, q in zip(row_major, quantized, strict=True)
                    ]
                ),
                3,
            ),
            "matmuls, NumPy sgemv on float32 (memory-bound)": float("nan"),
        }
        if batch == 1:
            arrays = [np.array(w) for w in row_major]
            vectors = {k: np.array(v)[0] for k, v in xs.items()}
            out["matmuls, NumPy sgemv on float32 (memory-bound)"] = best_ms(
                lambda: [w @ vectors[w.shape[1]] for w in arrays], 5
            )
        return out

    one, eight = matmuls(1), matmuls(8)
    for name in one:
        print(f"| {name} | {one[name]:.1f} | {eight[name]:.1f} |")
    for whole, products in (
        ("whole step, packed", "matmuls, packed (kiapi's kernel)"),
        ("whole step, float32 rows", "matmuls, float32 x @ W.T (rows)"),
    ):
        print(
            f"| everything else, {whole.split(', ', 1)[1]} (whole - its matmuls) | "
            f"{one[whole] - one[products]:.1f} | {eight[whole] - eight[products]:.1f} |"
        )
    print(
        "\ndecode tokens/s in-process: "
        + "; ".join(
            f"{layout} {1000 / one[f'whole step, {layout}']:.1f} (batch 1), "
            f"{8000 / eight[f'whole step, {layout}']:.1f} (batch 8)"
            for layout in ("packed", "float32 rows")
        )
    )

    # The packed step taken apart: the kernel's calls (products, the MLP's activation), the
    # MLX ops evaluated before each product, and the rest (kiapi's Python, the head's argmax).
    model = models["packed"].model
    spent: dict[str, float] = defaultdict(float)
    lib = qmatmul.kernel()
    evaluated_rows = qmatmul.evaluated_rows

    class TimedKernel:
        def __getattr__(self, name):
            function = getattr(lib, name)

            def timed(*args):
                started = time.perf_counter()
                function(*args)
                spent["kernel"] += time.perf_counter() - started

            return timed

    def timed_rows(x, inputs):
        started = time.perf_counter()
        rows = evaluated_rows(x, inputs)
        spent["mlx"] += time.perf_counter() - started
        return rows

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids]), cache=cache))
    token = mx.array([[ids[-1]]])
    steps = 20
    qmatmul.evaluated_rows, qmatmul.kernel = timed_rows, lambda: TimedKernel()
    try:
        started = time.perf_counter()
        for _ in range(steps):
            mx.eval(mx.argmax(model(token, cache=cache)[:, -1], axis=-1))
        whole = (time.perf_counter() - started) / steps * 1000
    finally:
        qmatmul.evaluated_rows, qmatmul.kernel = evaluated_rows, lambda: lib
    kernel_ms, mlx_ms = spent["kernel"] / steps * 1000, spent["mlx"] / steps * 1000
    print(
        f"\npacked step at batch 1, taken apart ({steps} steps, timers on): {whole:.1f} ms = "
        f"kiapi's kernel {kernel_ms:.1f} + MLX ops (norms, rotary embedding, attention, cache "
        f"update; evaluated before each product) {mlx_ms:.1f} + the rest (kiapi's Python, "
        f"copies into MLX, the argmax) {whole - kernel_ms - mlx_ms:.1f}"
    )

    def steady_ms(model, tokens: int = 32) -> float:
        """Per token of a greedy loop over a cache that grows, as a server decodes."""
        cache = [BatchKVCache(left_padding=[0]) for _ in model.layers]
        mx.eval(model(mx.array([ids]), cache=cache))
        token = mx.array([ids[-1]])
        started = time.perf_counter()
        for _ in range(tokens):
            token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(token)
        return (time.perf_counter() - started) / tokens * 1000

    print(
        "steady greedy loop, batch 1, per token (mlx-lm's BatchKVCache, as kiapi's continuous "
        + "batch): "
        + ", ".join(f"{layout} {steady_ms(chat.model):.1f} ms" for layout, chat in models.items())
    )

    # Prefill (time to first token): a 255-token prompt through the model, against the
    # float32 matrix products of the same rows alone.
    long_ids = (models["rows"].encode("hello world " * 200) * 2)[:255]
    prompt = mx.array([long_ids])
    rows = {n: mx.random.normal((len(long_ids), n)) for n in {w.shape[1] for w in row_major}}
    mx.eval(list(rows.values()))

    def prefill(model) -> None:
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        mx.eval([c.state for c in cache])

    # the tied head is not evaluated in prefill (mlx-lm keeps only the caches)
    layers = [w for name, w in named.items() if not name.endswith(".head")]
    products_ms = best_ms(lambda: mx.eval([rows[w.shape[1]] @ w.T for w in layers]), 2)
    times = {layout: best_ms(lambda m=chat.model: prefill(m), 2) for layout, chat in models.items()}
    if qmatmul.bf16_products():  # the packed model's products ran in bfloat16 (AMX) above
        times["packed, bfloat16 (AMX)"] = times.pop("packed")
        qmatmul.configure("float32")
        times["packed, float32 products"] = best_ms(lambda: prefill(models["packed"].model), 2)
        qmatmul.configure("auto")
    print(
        f"prefill, {len(long_ids)}-token prompt, in-process: "
        + ", ".join(f"{layout} {ms:.0f} ms" for layout, ms in times.items())
        + f"; the float32 products of those rows alone {products_ms:.0f} ms"
    )


if __name__ == "__main__":
    main()
