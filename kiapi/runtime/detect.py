"""What a model folder is, read from its own files (never from the network, never MLX).

:func:`inspect_model` reads ``config.json`` (architecture -> capability and engine) and the
sentence-transformers metadata, when present:

* ``modules.json``: the pipeline; its Pooling module's ``config.json`` gives the pooling
  (``cls``, ``mean``, ``max``, ``last``) and a ``Normalize`` module means unit vectors;
* ``sentence_bert_config.json``: ``max_seq_length`` (read again by the engine when it loads);
* ``config_sentence_transformers.json``: named ``prompts`` and ``default_prompt_name``.

A GGUF file (or a folder holding one) is a chat model for the mlx-lm engine. Anything kiapi
cannot run raises :class:`UnsupportedModel` naming what was found and what is supported.
The catalog calls it when it builds the registry (for entries of the user's catalog file) and
``kiapi models add`` calls it to write an entry.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from kiapi.runtime.weights import has_weights, read_json

EMBEDDING_TYPES = ("bert", "xlm-roberta", "modernbert", "qwen3")  # mlx-embeddings' encoders
RERANK_TYPES = ("bert", "xlm-roberta")  # cross-encoders (kiapi.runtime.rerank_engine)
POOLING_MODES = ("cls", "mean", "max", "last")
ST_POOLING_KEYS = {  # sentence-transformers Pooling config -> kiapi pooling
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
ST_UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"


class UnsupportedModel(ValueError):
    """The folder holds no model kiapi can serve; the message says what it found."""


@dataclass(frozen=True)
class Detected:
    """What :func:`inspect_model` found. ``folder`` holds the weights; ``filename`` names
    the GGUF file for GGUF models (None: Hugging Face layout)."""

    capability: str
    engine: str
    architecture: str
    folder: Path
    filename: str | None = None
    pooling: str | None = None
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    features: tuple[str, ...] = ("text",)


def chat_types() -> list[str]:
    """The ``model_type`` values mlx-lm has an architecture for (module names; no import)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return []
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    return sorted(p.stem for p in models.glob("*.py") if not p.stem.startswith("_"))


def inspect_model(path: Path, capability: str | None = None) -> Detected:
    """Inspect a model folder (or a GGUF file); ``capability`` overrides the guess."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path.parent, path.name, capability)
    if not path.is_dir():
        raise UnsupportedModel(f"{path}: no such folder or .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return _gguf(path, ggufs[0].name, capability)
    if not has_weights(path):
        raise UnsupportedModel(
            f"{path}: not a model folder (it needs config.json and *.safetensors weights in "
            "the Hugging Face layout, or one .gguf file)"
        )
    config = read_json(path, "config.json")
    model_type = str(config.get("model_type", "")).replace("_", "-")
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else model_type or "unknown"
    modules = read_json(path, "modules.json") if (path / "modules.json").is_file() else []
    is_sentence_transformer = bool(modules)
    if capability is None:
        capability = _guess_capability(architecture, model_type, is_sentence_transformer)
    if capability == "embedding":
        if "vision_config" in config:
            return Detected(
                "embedding", "mlx-embeddings", architecture, path, pooling="last",
                features=("text", "image"),
            )  # fmt: skip
        if model_type not in EMBEDDING_TYPES:
            raise UnsupportedModel(
                f"{path}: architecture {architecture} (model_type {model_type!r}) has no "
                f"embedding engine in kiapi; supported model types: {', '.join(EMBEDDING_TYPES)}"
            )
        pooling, normalize = _st_pipeline(path, modules, model_type)
        st = read_json(path, "config_sentence_transformers.json")
        prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
        default = st.get("default_prompt_name") or None
        return Detected(
            "embedding", "mlx-embeddings", architecture, path, pooling=pooling,
            normalize=normalize, prompts=prompts, default_prompt=default,
        )  # fmt: skip
    if capability == "chat":
        types = chat_types()
        if model_type.replace("-", "_") not in types:
            raise UnsupportedModel(
                f"{path}: architecture {architecture} (model_type {model_type!r}) has no chat "
                "engine in kiapi (mlx-lm's model types)"
            )
        return Detected("chat", "mlx-lm", architecture, path)
    if capability == "rerank":
        if not architecture.endswith("ForSequenceClassification") or model_type not in RERANK_TYPES:
            raise UnsupportedModel(
                f"{path}: architecture {architecture} is not a cross-encoder kiapi runs; "
                f"supported: {', '.join(RERANK_TYPES)} *ForSequenceClassification"
            )
        return Detected("rerank", "mlx-cross-encoder", architecture, path)
    raise UnsupportedModel(
        f"{path}: capability {capability!r} is not served by this kiapi (embedding, chat, "
        f"rerank); the folder holds {architecture}"
    )


def _gguf(folder: Path, filename: str, capability: str | None) -> Detected:
    if capability not in (None, "chat"):
        raise UnsupportedModel(f"{folder / filename}: GGUF files are chat models here")
    return Detected("chat", "mlx-lm", "gguf", folder, filename=filename)


def _guess_capability(architecture: str, model_type: str, sentence_transformer: bool) -> str:
    if architecture.endswith("ForSequenceClassification"):
        return "rerank"
    if sentence_transformer:
        return "embedding"
    if architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "chat"
    if model_type in EMBEDDING_TYPES:
        return "embedding"
    return "chat" if model_type.replace("-", "_") in chat_types() else "embedding"


def _st_pipeline(folder: Path, modules: list, model_type: str) -> tuple[str, bool]:
    """(pooling, normalize) from the sentence-transformers pipeline, or the architecture's
    usual choice when the folder has none (last token for Qwen3, mean for encoders)."""
    if not modules:
        return ("last" if model_type == "qwen3" else "mean"), True
    types = [str(m.get("type", "")) for m in modules]
    unknown = [t for t in types if t not in (ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE)]
    if unknown:
        raise UnsupportedModel(
            f"{folder}: modules.json has modules kiapi does not run: {', '.join(unknown)} "
            "(supported: Transformer, Pooling, Normalize)"
        )
    pooling = None
    for module in modules:
        if module.get("type") == ST_POOLING:
            config = read_json(folder / str(module.get("path", "")), "config.json")
            bad = [k for k in ST_UNSUPPORTED_POOLING if config.get(k)]
            modes = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)]
            if bad or len(modes) != 1:
                raise UnsupportedModel(
                    f"{folder}: pooling {', '.join(bad) or modes or 'none'} is not supported "
                    f"(one of: {', '.join(POOLING_MODES)})"
                )
            pooling = modes[0]
    if pooling is None:
        raise UnsupportedModel(f"{folder}: modules.json has no Pooling module")
    return pooling, ST_NORMALIZE in types
