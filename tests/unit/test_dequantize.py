"""kiapi expands quantized chat weights to float32 itself (``dequantized_float32``): the
values must be ``scale * q + bias`` in float32, unpacked in MLX's order, checked here against
a NumPy unpacking of the same words, and against ``mx.dequantize`` up to its float16 rounding."""

from __future__ import annotations

import numpy as np
import pytest


def numpy_expansion(packed, scales, biases, group_size, bits):
    words = np.asarray(packed).astype(np.uint64)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint64) * bits
    values = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    scale = np.repeat(np.asarray(scales).astype(np.float32), group_size, axis=-1)
    bias = np.repeat(np.asarray(biases).astype(np.float32), group_size, axis=-1)
    return values.astype(np.float32) * scale + bias


@pytest.mark.parametrize("bits", [2, 4, 8, 3, 6])
def test_expansion_is_scale_times_value_plus_bias_in_float32(bits):
    from kiapi.runtime.llm_engine import dequantized_float32
    from kiapi.runtime.mlx_import import import_mlx

    mx = import_mlx()  # kiapi loads its BLAS first: a bare `import mlx.core` would not

    rng = np.random.default_rng(bits)
    dense = mx.array(rng.standard_normal((48, 256)).astype(np.float32)).astype(mx.float16)
    packed, scales, biases = mx.quantize(dense, group_size=32, bits=bits)
    ours = dequantized_float32(packed, scales, biases, 32, bits)
    assert ours.dtype == mx.float32 and ours.shape == (48, 256)
    theirs = mx.dequantize(packed, scales, biases, group_size=32, bits=bits).astype(mx.float32)
    # mx.dequantize computes in float16: the two agree to its rounding, not bit for bit.
    assert np.abs(np.array(ours) - np.array(theirs)).max() <= 2e-3 * max(
        1.0, float(mx.abs(theirs).max())
    )
    if 32 % bits == 0:
        expected = numpy_expansion(packed, scales, biases, 32, bits)
        assert np.array_equal(np.array(ours), expected)
