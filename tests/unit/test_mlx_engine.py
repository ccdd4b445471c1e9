"""The MLX engine on real forward passes: the bundled all-MiniLM-L6-v2 against
sentence-transformers' vectors, and tiny random-weight Qwen3 / Qwen3-VL models against an
independent NumPy forward pass and against themselves (batching, padding, routing)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiapi.runtime.catalog import default_registry
from kiapi.runtime.embedding import EmbeddingItem
from kiapi.runtime.mlx_engine import TextEmbedder, VisionLanguageEmbedder, load_embedding_model
from tests import tiny_models

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
        assert abs(np.linalg.norm(out.vector) - 1) < 1e-5


def test_minilm_truncates_to_max_seq_length_and_reports_it(minilm):
    assert REFERENCE["max_seq_length"] == minilm.model.max_tokens == 256
    long = next(r for r in REFERENCE["items"] if r["name"] == "long_over_256_tokens")
    assert long["tokens"] == 256
    (out,) = minilm.model.embed(texts(long["text"] * 3))
    assert out.prompt_tokens == 256
    assert cosine(out.vector, long["vector"]) >= 0.9999  # same first 256 tokens


def test_minilm_weight_is_measured(minilm):
    params = 22_713_216  # all-MiniLM-L6-v2's parameter count, fp32
    assert minilm.weight_gb == pytest.approx(params * 4 / 1024**3, rel=0.01)


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
