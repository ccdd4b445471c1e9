"""kiapi expands quantized chat weights to float32 itself (``dequantized_float32``): the
values must be ``scale * q + bias`` in float32, unpacked in MLX's order, checked here against
a NumPy unpacking of the same words, and against ``mx.dequantize`` up to its float16 rounding;
the layers ``dequantize_for_cpu`` puts in their place compute with those values."""

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
    from kiapi.runtime.mlx_import import import_mlx
    from kiapi.runtime.mlx_quantized import dequantized_float32

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


def quantized_layers(bias: bool):
    from kiapi.runtime.mlx_import import import_mlx

    mx = import_mlx()
    import mlx.nn as nn

    class Tiny(nn.Module):  # an embedding tied to the output head, and one linear layer
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(40, 64)
            self.proj = nn.Linear(64, 96, bias=bias)

        def __call__(self, ids):
            return self.embed_tokens.as_linear(self.proj(self.embed_tokens(ids))[..., :64])

    mx.random.seed(3)
    model = Tiny()
    nn.quantize(model, group_size=32, bits=4)
    return mx, model


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_layers_compute_with_the_exact_float32_expansion(bias, layout):
    from kiapi.runtime.llm_engine import cpu_modules, dequantize_for_cpu
    from kiapi.runtime.mlx_quantized import dequantized_float32

    mx, model = quantized_layers(bias)
    emb, proj = model.embed_tokens, model.proj
    table = dequantized_float32(emb.weight, emb.scales, emb.biases, 32, 4)
    weight = dequantized_float32(proj.weight, proj.scales, proj.biases, 32, 4)
    ids = mx.array([[3, 0, 39, 3]])
    rows = np.array(table)[np.array(ids)]
    expected = rows @ np.array(weight).T + (np.array(proj.bias) if bias else 0)
    expected = expected[..., :64] @ np.array(table).T

    assert dequantize_for_cpu(model, layout) == layout
    column_major_linear, cpu_embedding = cpu_modules()
    assert isinstance(model.embed_tokens, cpu_embedding)
    if layout == "columns":
        assert isinstance(model.proj, column_major_linear)
        assert model.proj.weight_t.shape == (64, 96)  # stored transposed, contiguous
        assert "head_t" in model.embed_tokens
    else:
        assert type(model.proj).__name__ == "Linear" and model.proj.weight.shape == (96, 64)
        assert "head" in model.embed_tokens and "head_t" not in model.embed_tokens
    assert np.array_equal(np.array(model.embed_tokens(ids)), rows)  # lookups stay exact
    assert np.abs(np.array(model(ids)) - expected).max() < 1e-4


class StepTimer:
    """A fake ``perf_counter``: each call advances by the next of ``steps`` (cycled)."""

    def __init__(self, steps):
        self.steps, self.calls, self.now = steps, 0, 0.0

    def __call__(self):
        self.now += self.steps[self.calls % len(self.steps)]
        self.calls += 1
        return self.now


def layout_steps(*durations):
    """Timer steps for 5 rounds of each candidate in the order measured (packed when the
    kernel is offered, then rows, then columns): (start, stop) per round."""
    return [step for duration in durations for _ in range(5) for step in (0, duration)]


@pytest.mark.parametrize(
    ("durations", "chosen"),
    [
        ((3, 1, 2), "rows"),
        ((3, 2, 1), "columns"),
        ((3, 1.0, 0.95), "rows"),
        ((1, 2, 2), "packed"),
        ((1.1, 1, 1), "packed"),
        ((1.3, 1, 1.2), "rows"),
    ],
    ids=[
        "rows-faster",
        "columns-faster",
        "near-tie-goes-to-rows",
        "packed-faster",
        "near-tie-goes-to-packed",
        "float32-clearly-faster",
    ],
)
def test_the_faster_measured_layout_is_kept(durations, chosen):
    """Each candidate is timed 5 rounds in a row (packed first: the BLAS's threads, still
    spinning after the float32 rounds, would slow it): columns is kept over rows only when
    clearly (10%) faster, float32 over packed only when clearly (20%) faster."""
    from kiapi.runtime.llm_engine import dequantize_for_cpu

    _mx, model = quantized_layers(False)
    timer = StepTimer(layout_steps(*durations))
    assert dequantize_for_cpu(model, timer=timer) == chosen
    assert timer.calls == 30  # 5 rounds x 3 layouts x (start, stop)


def test_an_unknown_layout_is_refused():
    from kiapi.runtime.llm_engine import dequantize_for_cpu

    _mx, model = quantized_layers(False)
    with pytest.raises(ValueError, match="packed, rows, columns"):
        dequantize_for_cpu(model, "diagonal")


def test_an_untied_embedding_keeps_no_head_copy():
    from kiapi.runtime.llm_engine import dequantize_for_cpu

    _mx, model = quantized_layers(False)
    model.lm_head = model.proj  # an output head of its own: the table is never a matmul
    dequantize_for_cpu(model, "rows")
    assert "head_t" not in model.embed_tokens and "head" not in model.embed_tokens
