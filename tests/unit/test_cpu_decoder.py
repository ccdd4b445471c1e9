"""The two seams ``kiapi.runtime.cpu_decoder`` opens in mlx-lm (pinned below 0.33), checked
against mlx-lm's own code: its attention function, replaced in the llama/qwen modules, and
its SwiGLU ``MLP``, replaced over packed weights. Real mlx-lm modules, random weights."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from kiapi.runtime import interlude


@pytest.fixture(scope="module")
def mx():
    from kiapi.runtime import qmatmul
    from kiapi.runtime.mlx_import import import_mlx

    assert qmatmul.kernel() is not None, "the kernel needs a C compiler (cc), as mx.compile does"
    return import_mlx()


def random(mx, *shape, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def masks(mx, length, keys):
    """The masks mlx-lm hands attention: none, "causal", and the boolean arrays its
    ``BatchKVCache`` makes (a batch of 2, the second prompt left-padded by 3), and additive."""
    from mlx_lm.models.base import create_causal_mask

    offset = keys - length
    padded = create_causal_mask(length, offset=offset, left_padding=mx.array([0, 3]))
    additive = mx.where(create_causal_mask(length, offset=offset), 0.0, -1e9)
    return {"none": None, "causal": "causal", "padded": padded, "additive": additive}


@pytest.mark.parametrize("mask_name", ["none", "causal", "padded", "additive"])
@pytest.mark.parametrize(("length", "keys"), [(12, 12), (9, 20), (3, 20), (40, 45)])
def test_attention_equals_mlx_lms(mx, mask_name, length, keys):
    """Grouped heads (6 query heads on 2 key/value heads), keys longer than the queries (a
    cache), every mask kind; 3 queries (decoding-sized) go to mlx-lm's function itself; 40
    queries in a batch of 2 (over KERNEL_ROWS) run on every core where prefill's products run
    in bfloat16, and 45 keys are not a multiple of the kernel's vectors."""
    from mlx_lm.models.base import scaled_dot_product_attention as original

    from kiapi.runtime.cpu_decoder import attention

    queries = random(mx, 2, 6, length, 16, seed=1)
    keys_, values = random(mx, 2, 2, keys, 16, seed=2), random(mx, 2, 2, keys, 16, seed=3)
    mask = masks(mx, length, keys)[mask_name]
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    ours = attention(spy, queries, keys_, values, None, 0.25, mask)
    theirs = original(queries, keys_, values, cache=None, scale=0.25, mask=mask)
    assert ours.shape == theirs.shape == (2, 6, length, 16)
    assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-5
    assert len(calls) == (1 if length < 8 else 0)


def test_a_row_that_attends_to_nothing_averages_like_mlx_not_nan(mx):
    from mlx_lm.models.base import scaled_dot_product_attention as original

    from kiapi.runtime.cpu_decoder import attention

    keep = np.ones((1, 1, 8, 8), dtype=bool)
    keep[..., 2, :] = False  # a padding row
    values = random(mx, 1, 2, 8, 4, seed=4)
    out = attention(original, random(mx, 1, 2, 8, 4), random(mx, 1, 2, 8, 4), values, None,
                    0.5, mx.array(keep))  # fmt: skip
    out = np.array(out)
    assert np.isfinite(out).all()
    assert np.allclose(out[:, :, 2], np.array(values).mean(axis=2), atol=1e-6)


def test_installed_for_the_swiglu_modules_only(mx):
    import mlx_lm.models.llama as llama

    from kiapi.runtime import cpu_decoder

    assert cpu_decoder.install_attention("mlx_lm.models.llama")  # (stays: process-wide)
    assert cpu_decoder.install_attention("mlx_lm.models.llama")  # idempotent
    installed = llama.scaled_dot_product_attention
    assert installed.func is cpu_decoder.attention
    assert installed.args[0] is cpu_decoder._installed["mlx_lm.models.llama"]
    assert not cpu_decoder.install_attention("mlx_lm.models.gemma")  # GELU MLP, not ours


def tiny_llama(mx, bits: int):
    import mlx.nn as nn
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50,
        rope_theta=10000.0, tie_word_embeddings=True,
    )  # fmt: skip
    mx.random.seed(7)
    model = llama.Model(args)
    nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_a_packed_llama_computes_what_mlx_lm_does(mx, bits, monkeypatch):
    """mlx-lm's llama with MLX-quantized weights and mlx-lm's own attention (the reference:
    kiapi's may already be installed by another test), then packed by kiapi with kiapi's
    attention: every MLP becomes a ``PackedMLP``, and the logits of a prompt (prefill: the
    BLAS path) and of a decoded token (the kernel) stay equal."""
    import mlx_lm.models.llama as llama
    from mlx_lm.models.base import scaled_dot_product_attention as original
    from mlx_lm.models.cache import make_prompt_cache

    from kiapi.runtime import cpu_decoder
    from kiapi.runtime.llm_engine import dequantize_for_cpu

    ours = llama.scaled_dot_product_attention
    monkeypatch.setattr(llama, "scaled_dot_product_attention", original)
    model = tiny_llama(mx, bits)
    prompt = mx.array([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 23, 8, 46, 2, 6, 4, 33, 8]])

    def run():
        cache = make_prompt_cache(model)
        first = model(prompt, cache=cache)
        return np.array(first), np.array(model(mx.array([[11]]), cache=cache))

    reference = run()
    assert dequantize_for_cpu(model, "packed") == "packed"
    packed_mlp = cpu_decoder.packed_mlp_class()
    assert all(isinstance(layer.mlp, packed_mlp) for layer in model.layers)
    assert cpu_decoder.install_attention("mlx_lm.models.llama")
    if ours is original:  # installed by this test, or by an earlier one this monkeypatch undid
        ours = functools.partial(cpu_decoder.attention, original)
    monkeypatch.setattr(llama, "scaled_dot_product_attention", ours)
    assert llama.scaled_dot_product_attention.func is cpu_decoder.attention
    for got, theirs in zip(run(), reference, strict=True):
        assert np.abs(got - theirs).max() < 2e-4 * max(1.0, np.abs(theirs).max())

    # The worker's interludes: a checkpoint after every layer's MLP, where other work that
    # uses the same kernels and scratch buffers (here: kernel attention and a packed MLP on
    # other inputs) may run without changing the step's result.
    rng = np.random.default_rng(3)
    other = [mx.array(rng.standard_normal((1, 4, 12, 16)).astype(np.float32)) for _ in "qkv"]
    other_x = mx.array(rng.standard_normal((1, 40, 64)).astype(np.float32))
    ran: list[int] = []

    def interlude_work() -> None:
        mx.eval(ours(*other, None, 0.25, "causal"), model.layers[0].mlp(other_x))
        ran.append(1)

    with interlude.handling(interlude_work):
        outputs = run()
    assert len(ran) == 2 * len(model.layers)  # the prompt's pass and the decoded token's
    for got, theirs in zip(outputs, reference, strict=True):
        assert np.abs(got - theirs).max() < 2e-4 * max(1.0, np.abs(theirs).max())


def test_attention_runs_in_bfloat16_only_for_prompt_chunks_where_products_do(mx):
    """Over ``KERNEL_ROWS`` rows a packed model's products run in bfloat16 when the CPU has
    AMX, and prefill attention follows; decoding-sized and short chunks stay float32, and
    ``KIAPI_MATMUL_PRECISION=float32`` turns it off."""
    from kiapi.runtime import qmatmul
    from kiapi.runtime.cpu_decoder import bf16_attention

    assert not bf16_attention(qmatmul.KERNEL_ROWS)
    assert bf16_attention(qmatmul.KERNEL_ROWS + 1) == qmatmul.bf16_products()
    qmatmul.configure("float32")
    try:
        assert not bf16_attention(1000)
    finally:
        qmatmul.configure("auto")
