"""A chat model in the Hugging Face layout (what mlx-community repos hold), loaded by
mlx-lm's own loader through kiapi's ``load_hf``: a tiny random-weight Qwen3ForCausalLM
checked against an independent NumPy forward pass, its template from tokenizer_config.json."""

from __future__ import annotations

import numpy as np
import pytest

from tests import tiny_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.build_qwen3_chat(tmp_path_factory.mktemp("tiny") / "qwen3-chat")


@pytest.fixture(scope="module")
def chat(folder):
    from kiapi.runtime.llm_engine import load_hf

    return load_hf(folder, "qwen3-0.6b")


def test_logits_match_a_numpy_forward_pass(chat, folder):
    import mlx.core as mx

    ids = chat.encode(chat.render([{"role": "user", "content": "hello world"}]))
    ours = np.array(chat.model(mx.array([ids]))[0].astype(mx.float32))
    reference = tiny_models.qwen3_chat_logits(folder, ids)
    assert np.abs(ours - reference).max() < 1e-3
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_template_stop_token_and_context_come_from_the_folder(chat):
    prompt = chat.render([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.tokenizer.token_to_id("<|im_end|>") in chat.stop_ids
    assert chat.context_length == 256


def test_it_serves_through_the_api(folder, tmp_path):
    from starlette.testclient import TestClient

    from kiapi.app import create_app
    from kiapi.config import Settings

    settings = Settings(
        _env_file=None,
        files_root=tmp_path / "f",
        warmup="none",
        model_paths={"qwen3-0.6b": folder},
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        body = {
            "model": "qwen3",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 5,
            "temperature": 0,
        }
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        again = client.post("/v1/chat/completions", json=body).json()
    assert first.json()["choices"][0]["message"] == again["choices"][0]["message"]
    assert first.json()["model"] == "qwen3-0.6b"
    assert first.json()["usage"]["completion_tokens"] <= 5
