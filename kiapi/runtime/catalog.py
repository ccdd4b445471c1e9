"""The model catalog: kiapi's built-in entries (data: ``builtin_models.toml``, package data
read by the same parser as the user's catalog file) and the user's entries, as one registry.
Each entry names its engine (``kiapi.runtime.engines``), never a loader function.

Catalog order matters: when the default model is not set up, the first set-up model in this
order serves instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kiapi.runtime.catalog_file import read_catalog_file
from kiapi.runtime.registry import ModelSpec, Registry

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

BUILTIN_CATALOG = Path(__file__).with_name("builtin_models.toml")


def builtin_models() -> list[ModelSpec]:
    """The entries of :data:`BUILTIN_CATALOG` (package data, read once per registry). A bad
    entry there is kiapi's own bug, so it raises instead of being skipped."""
    found = read_catalog_file(BUILTIN_CATALOG, builtin=True)
    if found.problems:
        raise RuntimeError("kiapi's built-in catalog is invalid: " + "; ".join(found.problems))
    return found.specs


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
    specs = with_model_paths(builtin_models(), model_paths or {})
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
