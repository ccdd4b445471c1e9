"""Tiny random-weight models of each supported encoder architecture, written by transformers
in the exact Hugging Face / sentence-transformers layout, loaded through kiapi's catalog and
loader, against what sentence-transformers computes on torch (``tests/fixtures/tiny/
references.json``, made by ``tests/fixtures/tiny/make_tiny.py`` in a separate environment)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiapi.runtime.catalog import default_registry
from kiapi.runtime.embedding import EmbeddingItem, l2_normalize, parse_request
from kiapi.runtime.errors import BadRequest
from kiapi.runtime.mlx_engine import load_embedding_model
from tests import tiny_models

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"
REFERENCES = json.loads((TINY / "references.json").read_text())
ARCHITECTURES = ["bert-embedding", "xlm-roberta-embedding", "modernbert-embedding"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    catalog = tmp_path_factory.mktemp("catalog") / "models.toml"
    catalog.write_text(
        "".join(f'[[models]]\nname = "{n}"\npath = "{TINY / n}"\n\n' for n in ARCHITECTURES)
    )
    registry = default_registry(None, catalog)
    assert registry.problems == []
    return registry


@pytest.fixture(scope="module")
def models(registry):
    return {n: load_embedding_model(registry.resolve("embedding", n)).model for n in ARCHITECTURES}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_vectors_and_token_counts_equal_sentence_transformers(registry, models, name):
    spec, ref = registry.resolve("embedding", name), REFERENCES[name]
    outs = models[name].embed([EmbeddingItem(text=t) for t in ref["texts"]])
    for out, expected, tokens in zip(outs, ref["plain"], ref["tokens"], strict=True):
        assert out.prompt_tokens == tokens  # the third text is truncated to max_seq_length
        assert cosine(out.vector, expected) >= 0.9999
        vector = l2_normalize(out.vector) if spec.normalize else np.asarray(out.vector)
        # scale too, normalized or not; bfloat16 products (AMX) round: measured up to 2e-3
        fast = getattr(models[name], "fast", None)
        atol = 5e-3 if fast is not None and fast.bf16 else 2e-4
        np.testing.assert_allclose(vector, expected, atol=atol)


def quantized_copy(tmp_path: Path, name: str, capability: str):
    """The spec of an 8-bit MLX-quantized copy of tiny model ``name``, through the catalog."""
    folder = tiny_models.quantize_encoder_folder(TINY / name, tmp_path / "q8")
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[[models]]\nname = "q8"\npath = "{folder}"\n')
    registry = default_registry(None, catalog)
    assert registry.problems == []
    return registry.resolve(capability, "q8")


@pytest.mark.parametrize("name", ["bert-embedding", "xlm-roberta-embedding"])
def test_mlx_quantized_folders_load_through_the_catalog(tmp_path, name):
    """An MLX-quantized copy (8-bit, as mlx conversions store one) loads through the catalog
    with quantized layers and stays next to sentence-transformers' float32 vectors."""
    loaded = load_embedding_model(quantized_copy(tmp_path, name, "embedding")).model
    kinds = {type(m).__name__ for _, m in loaded.model.named_modules()}
    assert "QuantizedLinear" in kinds
    if loaded.fast is not None:  # BERT's fast path holds float32 copies or bfloat16 tiles
        matrices = ("w_qkv", "w_out", "w_up", "w_down", "qkv", "out", "up", "down")
        held = [v for p in loaded.fast.layers for k, v in p.items() if k in matrices]
        assert len(held) == 4 * len(loaded.fast.layers)
        assert loaded.fast.extra_bytes() >= sum(v.nbytes for v in held)
    ref = REFERENCES[name]
    outs = loaded.embed([EmbeddingItem(text=t) for t in ref["texts"]])
    for out, expected in zip(outs, ref["plain"], strict=True):
        assert cosine(out.vector, expected) >= 0.999  # 8-bit weights: not bit-exact


@pytest.mark.parametrize("name", ["bert-reranker", "xlm-roberta-reranker"])
def test_mlx_quantized_rerankers_load_through_the_catalog(tmp_path, name):
    """The same for cross-encoders: encoder and classifier stored 8-bit, scores next to
    sentence-transformers' CrossEncoder on the float32 weights."""
    from kiapi.runtime.rerank_engine import load_reranker

    reranker = load_reranker(quantized_copy(tmp_path, name, "rerank")).model
    assert "QuantizedLinear" in {type(m).__name__ for _, m in reranker.model.named_modules()}
    ref = REFERENCES[name]
    scores, _tokens = reranker.score(ref["query"], ref["documents"])
    np.testing.assert_allclose(scores, ref["scores"], atol=0.03)  # 8-bit weights


def test_named_prompts_are_applied_as_sentence_transformers_does(registry, models):
    spec, ref = registry.resolve("embedding", "bert-embedding"), REFERENCES["bert-embedding"]
    for prompt in ("query", "document"):
        texts = [
            parse_request(registry, {"model": spec.name, "text": t, "prompt_name": prompt}).text
            for t in ref["texts"]
        ]
        outs = models["bert-embedding"].embed([EmbeddingItem(text=t) for t in texts])
        for out, expected in zip(outs, ref[f"prompt:{prompt}"], strict=True):
            assert cosine(out.vector, expected) >= 0.9999
    with pytest.raises(BadRequest, match="no prompt named 'passage'.*query, document"):
        parse_request(registry, {"model": spec.name, "text": "x", "prompt_name": "passage"})
    with pytest.raises(BadRequest, match="takes no instruction"):
        parse_request(registry, {"model": spec.name, "text": "x", "instruction": "find"})


def test_truncate_false_refuses_a_long_text_with_its_count_and_the_limit(models):
    model = models["bert-embedding"]  # max_seq_length 24
    long_text = REFERENCES["bert-embedding"]["texts"][2]
    short, refused, cut = model.embed(
        [
            EmbeddingItem(text="the quick brown fox", truncate=False),
            EmbeddingItem(text=long_text, truncate=False),
            EmbeddingItem(text=long_text),
        ]
    )
    assert short.prompt_tokens == 6 and cut.prompt_tokens == 24
    assert isinstance(refused, BadRequest) and refused.status == 400
    # the same WordPiece vocabulary untruncated (ModernBERT's fixture, 64 positions): 37 tokens
    whole = REFERENCES["modernbert-embedding"]["tokens"][2]
    assert f"has {whole} tokens but the model's limit is 24" in refused.detail
    huge = model.embed([EmbeddingItem(text="fox " * 100_000, truncate=False)])[0]
    assert "at least" in huge.detail  # counted on a prefix, not the whole 400 kB


def test_an_instruction_uses_the_models_template():
    spec = default_registry().resolve("embedding", "qwen3-embedding-8b")
    request = parse_request(
        default_registry(),
        {"model": spec.name, "text": "what is {text}?", "instruction": "Find {x}"},
    )
    assert request.text == "Instruct: Find {x}\nQuery:what is {text}?"
