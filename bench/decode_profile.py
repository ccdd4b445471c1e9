"""Where one SmolLM2 decode step goes on this CPU: the profile behind kiapi's chat speed.

    .venv/bin/python bench/decode_profile.py

Loads the bundled GGUF through kiapi's loader and prints, per decoded token at batch 1 and 8:

* the whole step (``model(token, cache)`` and the argmax), in-process, no server;
* the matrix products alone: every weight matrix of the model (211, with the tied output head)
  multiplied through MLX as kiapi stores it (float32, transposed: ``x @ Wt``), as
  ``nn.Linear`` stores it (``x @ W.T``), as MLX's 4-bit quantized matmul runs it, and through
  NumPy's BLAS ``sgemv`` (batch 1), which is what the memory bandwidth allows;
* what is left for the other MLX ops of a step (norms, rotary embedding, attention, the
  cache update);
* a steady greedy loop over a growing cache, with mlx-lm's plain ``KVCache`` and with the
  ``BatchKVCache`` its ``BatchGenerator`` (kiapi's continuous batch) uses.

Each table figure is the best of 3 rounds. Prints a table and the loop's figures.
"""

from __future__ import annotations

import sys
import time
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


def main() -> None:
    from kiapi.config import Settings
    from kiapi.runtime import blas

    status = blas.activate(Settings(_env_file=None).blas)
    mx = import_mlx()
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from kiapi.runtime.llm_engine import load_gguf

    chat = load_gguf(smollm2_gguf())
    model = chat.model
    ids = chat.encode(PROMPT)
    flat = tree_flatten(model.parameters())
    # every weight matrix as (inputs, outputs), whichever layout the loader chose
    if chat.weight_layout == "columns":
        stored = [a for name, a in flat if name.endswith(("weight_t", "head_t"))]
    else:
        stored = [
            mx.contiguous(a.T)
            for name, a in flat
            if name.endswith((".weight", ".head")) and a.ndim == 2 and a.dtype == mx.float32
        ]

    def step_ms(batch: int) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([ids] * batch), cache=cache))
        token = mx.array([[ids[-1]]] * batch)

        def one() -> None:
            logits = model(token, cache=cache)
            mx.eval(mx.argmax(logits[:, -1], axis=-1))

        return best_ms(one, 10)

    print(f"machine: {machine()}; BLAS: {status.describe()}")
    print(
        f"SmolLM2-135M-Instruct, {len(stored)} weight matrices, float32 in kiapi, "
        f"stored by {chat.weight_layout} (the faster here, measured at load)\n"
    )
    print("| per decoded token, ms | batch 1 | batch 8 |")
    print("|---|---|---|")

    def matmuls(batch: int) -> dict[str, float]:
        xs = {w.shape[0]: mx.random.normal((batch, w.shape[0])) for w in stored}
        row_major = [mx.contiguous(w.T) for w in stored]
        quantized = [mx.quantize(w, 32, 4) for w in row_major]
        mx.eval(list(xs.values()), row_major, quantized)
        out = {
            "whole step (model + argmax)": step_ms(batch),
            "matmuls, x @ Wt (columns)": best_ms(
                lambda: mx.eval([xs[w.shape[0]] @ w for w in stored]), 5
            ),
            "matmuls, x @ W.T (rows, nn.Linear's)": best_ms(
                lambda: mx.eval([xs[w.shape[1]] @ w.T for w in row_major]), 5
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
            "matmuls, NumPy sgemv (memory-bound)": float("nan"),
        }
        if batch == 1:
            arrays = [np.array(w) for w in row_major]
            vectors = {k: np.array(v)[0] for k, v in xs.items()}
            out["matmuls, NumPy sgemv (memory-bound)"] = best_ms(
                lambda: [w @ vectors[w.shape[1]] for w in arrays], 5
            )
        return out

    one, eight = matmuls(1), matmuls(8)
    rows = {name: (one[name], eight[name]) for name in one}
    for name, (one, eight) in rows.items():
        print(f"| {name} | {one:.1f} | {eight:.1f} |")
    ours = (
        "matmuls, x @ Wt (columns)"
        if chat.weight_layout == "columns"
        else ("matmuls, x @ W.T (rows, nn.Linear's)")
    )
    whole, matmuls = rows["whole step (model + argmax)"], rows[ours]
    print(
        f"| everything else (whole - kiapi's matmuls) | {whole[0] - matmuls[0]:.1f} "
        f"| {whole[1] - matmuls[1]:.1f} |"
    )
    print(f"\ndecode tokens/s: {1000 / whole[0]:.1f} (batch 1), {8000 / whole[1]:.1f} (batch 8)")

    def steady_ms(cache, tokens: int = 32) -> float:
        """Per token of a greedy loop over a cache that grows, as a server decodes."""
        mx.eval(model(mx.array([ids]), cache=cache))
        token = mx.array([ids[-1]])
        started = time.perf_counter()
        for _ in range(tokens):
            token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(token)
        return (time.perf_counter() - started) / tokens * 1000

    plain = steady_ms(make_prompt_cache(model))
    batched = steady_ms([BatchKVCache(left_padding=[0]) for _ in model.layers])
    print(
        f"steady greedy loop, batch 1, per token: {plain:.1f} ms with mlx-lm's KVCache, "
        f"{batched:.1f} ms with its BatchKVCache (what kiapi's continuous batch uses)"
    )

    # Prefill (time to first token): a 256-token prompt through the model, against the
    # matrix products of the same rows alone (the weights as kiapi stores them).
    long_ids = (chat.encode("hello world " * 200) * 2)[:255]
    prompt = mx.array([long_ids])
    rows = {w.shape[0]: mx.random.normal((len(long_ids), w.shape[0])) for w in stored}
    mx.eval(list(rows.values()))

    def prefill() -> None:
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        mx.eval([c.state for c in cache])

    prefill_ms = best_ms(prefill, 2)
    products_ms = best_ms(lambda: mx.eval([rows[w.shape[0]] @ w for w in stored]), 2)
    print(
        f"prefill, {len(long_ids)}-token prompt: {prefill_ms:.0f} ms in-process; the matrix "
        f"products of those rows alone {products_ms:.0f} ms; everything else "
        f"{prefill_ms - products_ms:.0f} ms"
    )


if __name__ == "__main__":
    main()
