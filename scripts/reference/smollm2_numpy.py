"""Reference logits for SmolLM2-135M-Instruct (GGUF Q4_1) from an independent NumPy forward
pass: the tensors dequantized with the ``gguf`` package (llama.cpp's own Python reader), the
llama architecture written out in NumPy. Nothing of kiapi, MLX or mlx-lm is imported.

Run in its own environment (the fixture is committed; tests never run this):

    python3 -m venv /tmp/gguf-ref && /tmp/gguf-ref/bin/pip install gguf numpy
    /tmp/gguf-ref/bin/python scripts/reference/smollm2_numpy.py GGUF_FILE PROMPTS_JSON OUT_JSON

``PROMPTS_JSON``: the output of ``smollm2_llamacpp.py`` (each prompt's ids from llama.cpp's
tokenizer and llama.cpp's greedy continuation). The forward pass runs over the prompt and
that continuation (teacher-forced), so the reference also judges each continuation token.
For each position the output keeps the 8 largest logits (token id and value), enough to
check kiapi's top-1 at every position and its logits' deviation where they matter.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

TOP = 8


def load(path: str):
    reader = GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}

    def scalar(name):
        field = fields[name]
        return field.parts[field.data[0]][0].item()

    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = values.reshape([int(n) for n in reversed(t.shape)])  # rows, columns
    config = {
        "layers": scalar("llama.block_count"),
        "heads": scalar("llama.attention.head_count"),
        "kv_heads": scalar("llama.attention.head_count_kv"),
        "eps": scalar("llama.attention.layer_norm_rms_epsilon"),
        "theta": scalar("llama.rope.freq_base"),
    }
    return tensors, config


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_interleaved(x, positions, theta):
    """Rotary embedding on pairs (0,1), (2,3), ...: GGUF stores Q and K rows permuted for it."""
    dim = x.shape[-1]
    freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions[:, None] * freqs[None, :]  # (T, dim/2)
    cos, sin = np.cos(angles)[None], np.sin(angles)[None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def forward(tensors, config, ids):
    """Logits (T, vocab), float64 accumulation, causal attention over the whole prompt."""
    x = tensors["token_embd.weight"][ids].astype(np.float64)
    T = len(ids)
    heads, kv_heads = config["heads"], config["kv_heads"]
    hidden = x.shape[-1]
    head_dim = hidden // heads
    positions = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for layer in range(config["layers"]):

        def w(name, layer=layer):
            return tensors[f"blk.{layer}.{name}.weight"].astype(np.float64)

        h = rms_norm(x, w("attn_norm"), config["eps"])
        q = (h @ w("attn_q").T).reshape(T, heads, head_dim).transpose(1, 0, 2)
        k = (h @ w("attn_k").T).reshape(T, kv_heads, head_dim).transpose(1, 0, 2)
        v = (h @ w("attn_v").T).reshape(T, kv_heads, head_dim).transpose(1, 0, 2)
        q = rope_interleaved(q, positions, config["theta"])
        k = rope_interleaved(k, positions, config["theta"])
        group = heads // kv_heads
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(T, hidden)
        x = x + attended @ w("attn_output").T
        h = rms_norm(x, w("ffn_norm"), config["eps"])
        gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T
    x = rms_norm(x, tensors["output_norm.weight"].astype(np.float64), config["eps"])
    head = tensors.get("output.weight", tensors["token_embd.weight"]).astype(np.float64)
    return x @ head.T


def main(gguf_path: str, prompts_path: str, out_path: str) -> None:
    tensors, config = load(gguf_path)
    with open(prompts_path) as fh:
        prompts = json.load(fh)["llamacpp"]
    results = []
    for prompt in prompts:
        logits = forward(tensors, config, np.array(prompt["ids"] + prompt["greedy"]))
        top = np.argsort(-logits, axis=-1)[:, :TOP]
        results.append(
            {
                "text": prompt["text"],
                "ids": prompt["ids"],
                "top_ids": top.tolist(),
                "top_logits": np.take_along_axis(logits, top, axis=-1).round(5).tolist(),
            }
        )
        print(f"{len(prompt['ids'])} positions, last top-1 {top[-1, 0]}", file=sys.stderr)
    with open(out_path, "w") as fh:
        json.dump({"numpy": results}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
