"""Expanding MLX-quantized tensors (packed ``weight`` + ``scales`` [+ ``biases``]) back to
float32, for the engines that run float32 products on the CPU: the chat engine's weights,
a quantized BERT's fast path and a quantized reranker's classifier. MLX's CPU backend has no
fast quantized matmul, so each engine expands once, at load. MLX is imported lazily.
"""

from __future__ import annotations

from typing import Any

from kiapi.runtime.mlx_import import import_mlx


def dequantized_float32(
    packed: Any,
    scales: Any,
    biases: Any,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> Any:
    """``scale * q + bias`` for every packed value, computed in float32.

    MLX packs ``32 // bits`` values into each uint32, the first in the lowest bits. Two
    reasons not to call ``mx.dequantize``: on the CPU it is slow (``bench/dequantize.py``:
    3.9 s for SmolLM2's 211 matrices, 0.6 s for this element-wise form), and it computes in the
    scales' dtype (float16 for GGUF files), so its values are off by up to 4e-3 from the float32
    expansion llama.cpp and the ``gguf`` package make (this form equals that expansion bit
    for bit; ``scripts/reference/smollm2_f32_gguf.py``). Widths that do not divide 32 (3, 5,
    6 bits) straddle words, and other modes (``mxfp8``, ``mxfp4``: no biases) are not
    ``scale * q + bias``; those go through ``mx.dequantize``."""
    mx = import_mlx()
    if 32 % bits or mode != "affine" or biases is None:
        return mx.dequantize(
            packed, scales, biases, group_size=group_size, bits=bits, mode=mode
        ).astype(mx.float32)
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    groups = values.reshape(*packed.shape[:-1], scales.shape[-1], group_size)
    weight = groups.astype(mx.float32) * scales[..., None].astype(mx.float32)
    weight = weight + biases[..., None].astype(mx.float32)
    return weight.reshape(*packed.shape[:-1], scales.shape[-1] * group_size)


def float_linear_weight(linear: Any) -> Any:
    """A linear layer's (outputs, inputs) weight: as stored, or expanded to float32 from a
    ``QuantizedLinear``."""
    if "scales" not in linear:
        return linear.weight
    return dequantized_float32(
        linear.weight,
        linear.scales,
        linear.get("biases"),
        linear.group_size,
        linear.bits,
        getattr(linear, "mode", "affine"),
    )
