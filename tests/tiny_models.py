"""Tiny random-weight models in the Hugging Face layout, for testing the real loader.

Each builder writes a folder like a downloaded model repo — ``config.json``, ``*.safetensors``
and a tokenizer trained here with ``tokenizers`` — that kiapi loads through the same code path
users get (``KIAPI_MODEL_PATHS`` or a catalog entry's weight source). Nothing is mocked.

* :func:`build_qwen3` writes a Qwen3 embedding model with the tensor names of the original
  ``Qwen3Model`` checkpoints (no ``model.`` prefix), from NumPy, so that the loader's name
  mapping is exercised; :func:`qwen3_reference` is an independent NumPy forward pass of it.
* :func:`build_qwen3_vl` writes a Qwen3-VL embedding model as an MLX conversion stores it, with
  a chat template and an image processor config for the transformers processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "embedding models map text to vectors",
    "a picture is worth a thousand words",
    "kiapi serves embeddings on one worker thread",
    "Ünïcödé façade naïve café 東京 🚀",
] * 20

END_OF_TEXT = "<|endoftext|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

QWEN3_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 48,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}


def train_tokenizer(special: list[str], *, append_end_of_text: bool, vocab_size: int = 400):
    """A byte-level BPE tokenizer; optionally appends ``<|endoftext|>`` like Qwen3-Embedding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if append_end_of_text:
        eot = tokenizer.token_to_id(END_OF_TEXT)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, eot)]
        )
    return tokenizer


def build_qwen3(folder: Path, *, seed: int = 0, append_end_of_text: bool = True) -> Path:
    """A 2-layer Qwen3 embedding model (hidden 64, GQA 4/2 heads, 48 positions)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([END_OF_TEXT, *CHAT_TOKENS], append_end_of_text=append_end_of_text)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    eot = tokenizer.token_to_id(END_OF_TEXT)
    d = QWEN3_DIMS
    config = {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        **d,
        "vocab_size": vocab,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "model_max_length": 512})
    )
    rng = np.random.default_rng(seed)
    h, inter, hd = d["hidden_size"], d["intermediate_size"], d["head_dim"]
    nh, nkv = d["num_attention_heads"], d["num_key_value_heads"]

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    weights = {"embed_tokens.weight": dense(vocab, h) * 4, "norm.weight": norm(h)}
    for i in range(d["num_hidden_layers"]):
        p = f"layers.{i}."
        weights |= {
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": dense(nh * hd, h),
            p + "self_attn.k_proj.weight": dense(nkv * hd, h),
            p + "self_attn.v_proj.weight": dense(nkv * hd, h),
            p + "self_attn.o_proj.weight": dense(h, nh * hd),
            p + "self_attn.q_norm.weight": norm(hd),
            p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate_proj.weight": dense(inter, h),
            p + "mlp.up_proj.weight": dense(inter, h),
            p + "mlp.down_proj.weight": dense(h, inter),
        }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def load_numpy_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def qwen3_reference(folder: Path, ids: list[int]) -> np.ndarray:
    """Independent NumPy forward pass of :func:`build_qwen3`'s model: the L2-normalised hidden
    state of the last token (last-token pooling), in float64."""
    last = qwen3_hidden(folder, ids)[-1]
    return last / np.linalg.norm(last)


QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen3_chat(folder: Path, *, seed: int = 1) -> Path:
    """:func:`build_qwen3`'s model as a causal LM in the Hugging Face layout mlx-community
    repos use (``Qwen3ForCausalLM``: ``model.*`` tensors and an ``lm_head``), with a ChatML
    template in ``tokenizer_config.json`` and ``<|im_end|>`` as its end-of-turn token."""
    build_qwen3(folder, seed=seed, append_end_of_text=False)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|im_end|>")
    config |= {
        "architectures": ["Qwen3ForCausalLM"],
        "eos_token_id": im_end,
        "max_position_embeddings": 256,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "pad_token": END_OF_TEXT,
                "model_max_length": 256,
                "chat_template": QWEN3_CHAT_TEMPLATE,
            }
        )
    )
    weights = {f"model.{k}": v for k, v in load_numpy_weights(folder).items()}
    rng = np.random.default_rng(seed + 100)
    vocab, hidden = weights["model.embed_tokens.weight"].shape
    weights["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) / 2).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def qwen3_chat_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Independent NumPy logits of :func:`build_qwen3_chat`'s model at every position."""
    weights = load_numpy_weights(folder)
    hidden = qwen3_hidden(folder, ids, {k.removeprefix("model."): v for k, v in weights.items()})
    return hidden @ weights["lm_head.weight"].astype(np.float64).T


def qwen3_hidden(folder: Path, ids: list[int], weights=None) -> np.ndarray:
    """The final-normed hidden states of a tiny Qwen3 at every position (NumPy, float64)."""
    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in (weights or load_numpy_weights(folder)).items()}
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    t = len(ids)

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    inv_freq = theta ** (-np.arange(0, hd, 2) / hd)
    angles = np.arange(t)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(x):  # (heads, t, hd), rotating the two halves (non-interleaved)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    causal = np.triu(np.full((t, t), -np.inf), k=1)
    hidden = w["embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        x = rms(hidden, w[p + "input_layernorm.weight"])
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q = rope(rms(q, w[p + "self_attn.q_norm.weight"]))
        k = rope(rms(k, w[p + "self_attn.k_norm.weight"]))
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        hidden = (
            hidden
            + attn.transpose(1, 0, 2).reshape(t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T
        )
        x = rms(hidden, w[p + "post_attention_layernorm.weight"])
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        hidden = hidden + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(hidden, w["norm.weight"])


def quantize_qwen3(source: Path, folder: Path, *, mode: str = "mxfp8") -> Path:
    """A copy of :func:`build_qwen3`'s model with every projection quantized the way MLX
    conversions (mlx-community ``*-mxfp8``) store them: ``weight`` + ``scales`` per layer."""
    from kiapi.runtime.mlx_engine import import_mlx

    mx = import_mlx()

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": mode}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    out = {}
    for key, value in load_numpy_weights(source).items():
        if key.endswith("_proj.weight"):
            wq, scales, *biases = mx.quantize(mx.array(value), group_size=32, bits=8, mode=mode)
            out[key] = wq
            out[key.removesuffix(".weight") + ".scales"] = scales
            if biases and biases[0] is not None:
                out[key.removesuffix(".weight") + ".biases"] = biases[0]
        else:
            out[key] = mx.array(value)
    mx.save_safetensors(str(folder / "model.safetensors"), out)
    return folder


def quantize_encoder_folder(source: Path, folder: Path, *, bits: int = 8) -> Path:
    """A copy of a Hugging Face encoder folder (the tiny BERT or XLM-R under tests/fixtures)
    as MLX conversions store a quantized one: every 2-D ``*.weight`` of the encoder's linear
    layers (not the embeddings) as packed ``weight`` + ``scales`` + ``biases`` (affine, group
    size 32), and ``quantization`` in ``config.json``; every other file as it is."""
    import shutil

    from kiapi.runtime.mlx_engine import import_mlx

    mx = import_mlx()
    shutil.copytree(source, folder)
    out = {}
    for key, value in mx.load(str(source / "model.safetensors")).items():
        linear = key.endswith(".weight") and value.ndim == 2 and "embeddings" not in key
        if linear and value.shape[-1] % 32 == 0:
            packed, scales, biases = mx.quantize(value, group_size=32, bits=bits)
            stem = key.removesuffix(".weight")
            out |= {key: packed, f"{stem}.scales": scales, f"{stem}.biases": biases}
        else:
            out[key] = value
    mx.save_safetensors(str(folder / "model.safetensors"), out)
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": bits}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


# ----------------------------------------------------------------------------- Qwen3-VL

QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

PATCH = 16
MERGE = 2


def build_qwen3_vl(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer Qwen3-VL embedding model (text hidden 32, one vision block, patch 16)."""
    from kiapi.runtime.mlx_engine import architecture, import_mlx

    mx = import_mlx()
    from mlx.utils import tree_flatten, tree_map

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(
        [END_OF_TEXT, *CHAT_TOKENS, *VISION_TOKENS], append_end_of_text=False
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in [END_OF_TEXT, *VISION_TOKENS]}
    vocab = tokenizer.get_vocab_size()
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab,
            "rope_theta": 1000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2]},
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 32,
            "num_heads": 2,
            "patch_size": PATCH,
            "in_channels": 3,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [],
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids[END_OF_TEXT],
        "vocab_size": vocab,
        "yes_token_id": 1,  # the reranker head's tokens; must exist in the tiny vocabulary
        "no_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": END_OF_TEXT,
                "model_max_length": 4096,
                "chat_template": QWEN3_VL_CHAT_TEMPLATE,
            }
        )
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "patch_size": PATCH,
                "temporal_patch_size": 2,
                "merge_size": MERGE,
                "min_pixels": (PATCH * MERGE) ** 2,
                "max_pixels": 4 * (PATCH * MERGE) ** 2,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    arch = architecture("qwen3_vl")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    params = tree_map(lambda p: p.astype(mx.float32), model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(params)))
    return folder
