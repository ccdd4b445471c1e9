"""The MLX engine on real forward passes: the bundled all-MiniLM-L6-v2 against
sentence-transformers' vectors, and tiny random-weight Qwen3 / Qwen3-VL models against an
independent NumPy forward pass and against themselves (batching, padding, routing)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiapi.runtime import blas, qmatmul
from kiapi.runtime.catalog import default_registry
from kiapi.runtime.embedding import EmbeddingItem, l2_normalize
from kiapi.runtime.mlx_engine import (
    FastBert,
    TextEmbedder,
    VisionLanguageEmbedder,
    import_mlx,
    length_groups,
    load_embedding_model,
    numpy_softmax,
    polynomial_gelu,
    pool,
)
from tests import tiny_models
from tests.support import minilm_weight_bytes

REFERENCE = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "minilm_reference.json").read_text("utf-8")
)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def texts(*values):
    return [EmbeddingItem(text=v) for v in values]


@pytest.fixture(scope="module")
def minilm():
    loaded = load_embedding_model(default_registry().resolve("embedding", "minilm"))
    yield loaded
    loaded.unload()


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def test_minilm_matches_sentence_transformers_one_by_one(minilm):
    for ref in REFERENCE["items"]:
        (out,) = minilm.model.embed(texts(ref["text"]))
        assert cosine(out.vector, ref["vector"]) >= 0.9999, ref["name"]
        assert out.prompt_tokens == ref["tokens"], ref["name"]


def test_minilm_matches_sentence_transformers_in_one_padded_batch(minilm):
    items = REFERENCE["items"]
    outs = minilm.model.embed(texts(*(ref["text"] for ref in items)))
    for ref, out in zip(items, outs, strict=True):
        assert cosine(out.vector, ref["vector"]) >= 0.9999, ref["name"]
        # the engine returns the pooled vector; the job scales it (run_embedding_batch);
        # bfloat16 products (AMX) round inputs and weights: measured up to 1.2e-3
        atol = 5e-3 if minilm.model.fast.bf16 else 1e-5
        np.testing.assert_allclose(l2_normalize(out.vector), ref["vector"], atol=atol)


def test_minilm_truncates_to_max_seq_length_and_reports_it(minilm):
    assert REFERENCE["max_seq_length"] == minilm.model.max_tokens == 256
    long = next(r for r in REFERENCE["items"] if r["name"] == "long_over_256_tokens")
    assert long["tokens"] == 256
    (out,) = minilm.model.embed(texts(long["text"] * 3))
    assert out.prompt_tokens == 256
    assert cosine(out.vector, long["vector"]) >= 0.9999  # same first 256 tokens


def test_minilm_is_served_by_the_fast_cpu_encoder(minilm):
    assert isinstance(minilm.model.fast, FastBert)


def original_hidden(model, ids, mask):
    """mlx-embeddings' own BERT forward pass: what FastBert must reproduce."""
    return np.array(model(ids, attention_mask=mask).last_hidden_state)


@pytest.mark.parametrize(
    ("streams", "numpy_softmax_min", "kernel", "bf16"),
    [
        (1, 1 << 30, False, False),
        (1, 0, False, False),
        (2, 1 << 30, False, False),
        (1, 0, True, False),
        (2, 0, True, False),
        (1, 0, True, True),
        (2, 0, True, True),
    ],
    ids=[
        "one-stream-mlx-softmax",
        "one-stream-numpy-softmax",
        "two-streams",
        "kernel-one-stream",
        "kernel-two-streams",
        "kernel-bfloat16-one-stream",
        "kernel-bfloat16-two-streams",
    ],
)
def test_fast_bert_reproduces_the_original_forward_pass(
    minilm, streams, numpy_softmax_min, kernel, bf16
):
    """In float32 to rounding (1e-4); with bfloat16 products (AMX: inputs and weights rounded
    to 8 bits of mantissa, sums in float32) every position's hidden state still points where
    the original's does (cosine >= 0.9999; by hand, the worst was 0.99996)."""
    if bf16 and not qmatmul.bf16_products():
        pytest.skip("this CPU has no AMX (or KIAPI_MATMUL_PRECISION=float32)")
    mx = import_mlx()
    embedder = minilm.model
    batch = embedder.token_ids([r["text"] for r in REFERENCE["items"]])
    width = max(len(ids) for ids in batch)
    ids = mx.array([ids + [0] * (width - len(ids)) for ids in batch])
    mask = mx.array([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    fast = FastBert(
        embedder.model,
        streams=streams,
        numpy_softmax_min=numpy_softmax_min,
        kernel=kernel,
        two_stream_min_tokens=0,  # the reference batch is small: split it all the same
        bf16=bf16,
    )
    assert fast.bf16 == bf16
    want = original_hidden(embedder.model, ids, mask)
    got = np.array(fast(ids, mask))
    assert got.shape == want.shape
    real = np.array(mask, dtype=bool)  # padded positions are never pooled
    if bf16:
        assert np.abs(got[real] - want[real]).max() > 1e-4  # rounded: not the float32 path
    else:
        assert np.abs(got[real] - want[real]).max() < 1e-4
    for row_got, row_want in zip(got[real], want[real], strict=True):
        assert cosine(row_got, row_want) >= (0.9999 if bf16 else 0.99999)


@pytest.mark.parametrize("texts_per_chunk", [1, 2, 3])
def test_a_bfloat16_encoder_in_chunks_of_texts_gives_the_whole_batchs_answer(
    minilm, monkeypatch, texts_per_chunk
):
    """Layers run on a few texts at a time (ENCODER_CHUNK_TOKENS, for the caches): every row
    of every product, and each text's attention, is its own, so the hidden states are the
    ones the whole batch at once gives, to the bit (a last chunk shorter than the others
    too)."""
    if not qmatmul.bf16_products():
        pytest.skip("this CPU has no AMX (or KIAPI_MATMUL_PRECISION=float32)")
    from kiapi.runtime import mlx_engine

    mx = import_mlx()
    embedder = minilm.model
    batch = embedder.token_ids([r["text"] for r in REFERENCE["items"]] * 2)[:7]
    width = max(len(ids) for ids in batch)
    ids = mx.array([ids + [0] * (width - len(ids)) for ids in batch])
    mask = mx.array([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    fast = FastBert(embedder.model, bf16=True)
    monkeypatch.setattr(mlx_engine, "ENCODER_CHUNK_TOKENS", 10**9)
    whole = np.array(fast(ids, mask))
    monkeypatch.setattr(mlx_engine, "ENCODER_CHUNK_TOKENS", texts_per_chunk * width + 1)
    chunked = np.array(fast(ids, mask))
    assert np.array_equal(chunked, whole)
    assert not np.array_equal(chunked[:, :, :8], np.zeros_like(chunked[:, :, :8]))


def test_the_bfloat16_path_embeds_with_numpy_and_the_kernel_as_mlx_does(minilm):
    """Word, position and token-type rows gathered by NumPy from views of the model's own
    tables (no copy), normalized in the kernel: MLX's embedding layer to float32 rounding."""
    if not qmatmul.bf16_products():
        pytest.skip("this CPU has no AMX (or KIAPI_MATMUL_PRECISION=float32)")
    mx = import_mlx()
    embedder = minilm.model
    fast = FastBert(embedder.model, bf16=True)
    words = fast.numpy_embeddings[0]
    table = embedder.model.embeddings.word_embeddings.weight
    assert np.shares_memory(words, np.array(table, copy=False))
    batch = embedder.token_ids([r["text"] for r in REFERENCE["items"]])
    width = max(len(ids) for ids in batch)
    ids = np.array([ids + [0] * (width - len(ids)) for ids in batch], dtype=np.int32)
    rows = len(batch)
    got = fast._embedded(ids, rows * width, fast.heads * fast.head_size, 2)  # NumPy, as embed's
    want = np.array(embedder.model.embeddings(mx.array(ids))).reshape(rows * width, -1)
    assert np.abs(got - want).max() < 1e-4
    # without AMX's path the MLX layer runs: no tables are held
    assert FastBert(embedder.model, bf16=False).numpy_embeddings is None


def test_a_two_stream_batch_gives_every_core_back_to_the_blas(minilm):
    """The two-stream split narrows OpenBLAS to one thread per stream for its call only: a
    chat model decoding next on the worker must not inherit one thread (it did: ~25% slower
    decode in a server that had embedded a batch)."""
    mx = import_mlx()
    fast = FastBert(minilm.model.model, streams=2, two_stream_min_tokens=0)  # split 2 rows
    if blas.threads() is None or fast.cores < 2:
        pytest.skip("needs OpenBLAS and two cores")
    ids = mx.array([[101, 7592, 102], [101, 2088, 102]])
    mx.eval(fast(ids, mx.ones(ids.shape, dtype=mx.int32)))
    assert blas.threads() == fast.cores


def test_fast_bert_off_gives_the_same_vectors(minilm):
    embedder = minilm.model
    items = texts(*(r["text"] for r in REFERENCE["items"]))
    fast = embedder.embed(items)
    embedder.fast, kept = None, embedder.fast
    try:
        plain = embedder.embed(items)
    finally:
        embedder.fast = kept
    floor = 0.9999 if embedder.fast.bf16 else 0.99999  # bfloat16: measured 0.99998
    for a, b in zip(fast, plain, strict=True):
        assert cosine(a.vector, b.vector) >= floor and a.prompt_tokens == b.prompt_tokens


def test_polynomial_gelu_matches_exact_gelu():
    mx = import_mlx()
    import mlx.nn as nn

    x = mx.concatenate([mx.linspace(-12, 12, 200_001), mx.random.normal((100_000,)) * 4])
    exact = np.array(nn.gelu(x), dtype=np.float64)
    got = np.array(polynomial_gelu(x), dtype=np.float64)
    assert np.abs(got - exact).max() < 2e-6
    assert np.isfinite(np.array(polynomial_gelu(mx.array([1e30, -1e30, 0.0])))).all()


def test_numpy_softmax_matches_mlx_softmax():
    mx = import_mlx()
    scores = mx.random.normal((2, 3, 7, 7)) * 20
    scores = scores + mx.array([0.0] * 5 + [-10000.0] * 2)  # masked positions
    got, want = np.array(numpy_softmax(scores)), np.array(mx.softmax(scores, axis=-1))
    assert np.abs(got - want).max() < 1e-6
    assert np.allclose(got.sum(axis=-1), 1, atol=1e-6)


def test_length_groups_keep_short_texts_together_and_long_ones_apart():
    assert length_groups([12] * 32) == [list(range(32))]
    assert length_groups([10, 11, 12, 14, 16]) == [[0, 1, 2, 3, 4]]
    groups = length_groups([12] * 16 + [200] * 16)
    assert groups == [list(range(16)), list(range(16, 32))]
    assert length_groups([]) == []
    assert length_groups([5]) == [[0]]
    # every index exactly once, in order
    lengths = sorted(np.random.default_rng(0).integers(1, 257, 100).tolist())
    flat = [i for g in length_groups(lengths) for i in g]
    assert flat == list(range(100))


def test_mixed_lengths_embed_in_input_order(minilm):
    short, long = "a short one", " ".join(["a much longer sentence about nothing"] * 30)
    together = minilm.model.embed(texts(long, short, long, short))
    alone = {t: minilm.model.embed(texts(t))[0].vector for t in (short, long)}
    for out, text in zip(together, (long, short, long, short), strict=True):
        assert cosine(out.vector, alone[text]) >= 0.9999


def test_blas_thread_count_can_be_set():
    status = blas.activate()
    if not status.path or "OpenBLAS" not in status.name:
        pytest.skip("needs OpenBLAS")
    import ctypes

    lib = ctypes.CDLL(status.path)
    before = lib.openblas_get_num_threads()
    try:
        assert blas.set_threads(1) and lib.openblas_get_num_threads() == 1
    finally:
        blas.set_threads(before)


def test_minilm_weight_is_measured(minilm):
    expected = minilm_weight_bytes(minilm.model.fast.bf16)
    assert minilm.weight_gb == pytest.approx(expected / 1024**3, rel=0.001)


def test_unloading_minilm_drops_the_fast_encoder_too():
    loaded = load_embedding_model(default_registry().resolve("embedding", "minilm"))
    embedder = loaded.model
    assert embedder.fast is not None
    loaded.unload()
    assert embedder.model is None and embedder.fast is None


# --------------------------------------------------------------------------- tiny Qwen3


def load_text(folder: Path) -> TextEmbedder:
    config = json.loads((folder / "config.json").read_text())
    return TextEmbedder.load(folder, config, pooling="last")


SENTENCES = ["the quick brown fox", "a", "embedding models map text to vectors 🚀", "café"]


def test_qwen3_matches_an_independent_numpy_forward_pass(tiny_qwen3):
    model = load_text(tiny_qwen3)
    for out, text in zip(model.embed(texts(*SENTENCES)), SENTENCES, strict=True):
        ids = model.token_ids([text])[0]
        assert out.prompt_tokens == len(ids)
        assert cosine(out.vector, tiny_models.qwen3_reference(tiny_qwen3, ids)) >= 0.9999, text


def test_qwen3_batch_of_one_equals_batch_of_many(tiny_qwen3):
    model = load_text(tiny_qwen3)
    batch = model.embed(texts(*SENTENCES))
    assert len({len(model.token_ids([s])[0]) for s in SENTENCES}) > 1  # padding happens
    for text, out in zip(SENTENCES, batch, strict=True):
        (alone,) = model.embed(texts(text))
        assert cosine(alone.vector, out.vector) >= 0.9999
        assert alone.prompt_tokens == out.prompt_tokens


def test_qwen3_pools_the_end_of_text_token_even_if_the_tokenizer_omits_it(tiny_qwen3, tmp_path):
    plain = tiny_models.build_qwen3(tmp_path / "plain", append_end_of_text=False)
    with_eot, without = load_text(tiny_qwen3), load_text(plain)
    eot = json.loads((tiny_qwen3 / "config.json").read_text())["eos_token_id"]
    for text in SENTENCES:
        assert with_eot.token_ids([text])[0][-1] == eot
        assert without.token_ids([text])[0] == with_eot.token_ids([text])[0]
    for a, b in zip(
        with_eot.embed(texts(*SENTENCES)), without.embed(texts(*SENTENCES)), strict=True
    ):
        assert cosine(a.vector, b.vector) >= 0.9999


def test_qwen3_truncates_to_its_positions_keeping_the_end_of_text_token(tiny_qwen3):
    model = load_text(tiny_qwen3)
    limit = tiny_models.QWEN3_DIMS["max_position_embeddings"]
    assert model.max_tokens == limit
    long = " ".join(SENTENCES * 20)
    ids = model.token_ids([long])[0]
    assert len(ids) == limit and ids[-1] == model.eos_id
    (out,) = model.embed(texts(long))
    assert out.prompt_tokens == limit
    assert cosine(out.vector, tiny_models.qwen3_reference(tiny_qwen3, ids)) >= 0.9999


def test_qwen3_mxfp8_checkpoint_loads_quantized(tiny_qwen3, tmp_path):
    quantized = load_text(tiny_models.quantize_qwen3(tiny_qwen3, tmp_path / "q8"))
    full = load_text(tiny_qwen3)
    layer = quantized.model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "QuantizedLinear"
    assert quantized.weight_gb < full.weight_gb
    for a, b in zip(quantized.embed(texts(*SENTENCES)), full.embed(texts(*SENTENCES)), strict=True):
        assert cosine(a.vector, b.vector) > 0.99  # 8-bit weights: close, not equal


def test_a_checkpoint_missing_a_tensor_is_refused(tiny_qwen3, tmp_path):
    from safetensors.numpy import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_qwen3 / name).read_bytes())
    weights = tiny_models.load_numpy_weights(tiny_qwen3)
    del weights["layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj"):
        load_text(broken)


def test_unload_drops_the_model(tiny_qwen3):
    model = load_text(tiny_qwen3)
    model.unload()
    assert model.model is None


# --------------------------------------------------------------------------- tiny Qwen3-VL


@pytest.fixture(scope="module")
def vl(tiny_qwen3_vl):
    return VisionLanguageEmbedder.load(tiny_qwen3_vl)


RED = Image.new("RGB", (64, 48), (200, 30, 30))
BLUE = Image.new("RGB", (90, 90), (20, 30, 230))


def test_vl_text_image_and_both_give_one_normalised_vector_each(vl):
    items = [
        EmbeddingItem(text="a red picture"),
        EmbeddingItem(image=RED),
        EmbeddingItem(text="a red picture", image=RED),
    ]
    outs = vl.embed(items)
    for out in outs:
        assert len(out.vector) == 32 and abs(np.linalg.norm(out.vector) - 1) < 1e-5
    # the image's tokens are embedded too: text + image costs more tokens than the text alone
    assert outs[2].prompt_tokens > outs[0].prompt_tokens
    assert cosine(outs[0].vector, outs[2].vector) < 0.9999


def test_vl_routes_the_image_through_the_vision_tower(vl):
    red, blue = vl.embed([EmbeddingItem(image=RED), EmbeddingItem(image=BLUE)])
    assert cosine(red.vector, blue.vector) < 0.9999
    (again,) = vl.embed([EmbeddingItem(image=RED.copy())])
    assert cosine(again.vector, red.vector) >= 0.9999


def test_vl_batch_of_one_equals_batch_of_many(vl):
    items = [
        EmbeddingItem(text="a red picture"),
        EmbeddingItem(image=BLUE),
        EmbeddingItem(text="two", image=RED),
        EmbeddingItem(text="the quick brown fox jumps"),
    ]
    batch = vl.embed(items)
    for item, out in zip(items, batch, strict=True):
        (alone,) = vl.embed([item])
        assert cosine(alone.vector, out.vector) >= 0.9999
        assert alone.prompt_tokens == out.prompt_tokens


def test_memory_is_given_back_after_a_large_batch(minilm):
    psutil = pytest.importorskip("psutil")
    mx = import_mlx()
    process = psutil.Process()
    long = " ".join(["a sentence long enough to fill the attention buffers"] * 40)
    minilm.model.embed(texts("warm"))
    before = process.memory_info().rss
    minilm.model.embed(texts(*[long] * 32))
    minilm.model.embed(texts(*[long] * 32))
    grown_mib = (process.memory_info().rss - before) / 2**20
    assert mx.get_cache_memory() <= 64 * 1024**2
    assert grown_mib < 100, f"RSS grew by {grown_mib:.0f} MiB after two 256-token batches"


@pytest.mark.parametrize("pooling", ["mean", "max", "cls", "last"])
def test_numpy_and_mlx_pool_the_same_as_a_loop_over_real_tokens(pooling):
    """``pool`` with NumPy (the bfloat16 encoder's path) and with MLX (every other forward
    pass) against a per-text loop over each text's real tokens: padding never counts."""
    mx = import_mlx()
    rng = np.random.default_rng(7)
    lengths = [5, 1, 3]
    hidden = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = (np.arange(5)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    hidden[mask == 0] = 100.0  # padding rows that would show in any pooling that read them
    real = [hidden[i, :n] for i, n in enumerate(lengths)]
    expected = np.stack(
        {
            "mean": [r.mean(axis=0) for r in real],
            "max": [r.max(axis=0) for r in real],
            "cls": [r[0] for r in real],
            "last": [r[-1] for r in real],
        }[pooling]
    )
    with_numpy = pool(np, hidden, mask, pooling)
    with_mlx = np.array(pool(mx, mx.array(hidden), mx.array(mask), pooling))
    assert np.allclose(with_numpy, expected, atol=1e-6)
    assert np.allclose(with_mlx, expected, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "max", "cls", "last"])
def test_pooled_vectors_outlive_the_next_batch(minilm, monkeypatch, pooling):
    """Vectors own their memory: the bfloat16 encoder's hidden states are the worker's reused
    buffer, and CLS pooling of them is a view. Short texts in a call with a long one (two
    length groups, the long one run second) and after another call equal the same texts
    alone."""
    embedder = minilm.model
    monkeypatch.setattr(embedder, "pooling", pooling)
    short = ["a cat sat on the mat", "the sea is calm today"]
    alone = [out.vector.copy() for out in embedder.embed(texts(*short))]
    mixed = embedder.embed(texts(*short, "a much longer text " * 40))
    embedder.embed(texts("another call that reuses the buffers " * 10))
    for before, out in zip(alone, mixed[:2], strict=True):
        np.testing.assert_allclose(out.vector, before, atol=1e-5)
