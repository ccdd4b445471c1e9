"""Where a model's weights come from: never the network.

A model is *set up* when its folder (Hugging Face layout: ``config.json``, ``*.safetensors``,
``tokenizer.json``) is found without any network access, looked up in this order:

1. an explicit path from ``KIAPI_MODEL_PATHS`` (if given, it must be valid: no fallback);
2. the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), looked up offline;
3. a Python package that carries the folder (the bundled all-MiniLM-L6-v2).

Models may also need optional Python packages (the vision-language engine); a model whose
packages are missing is not set up either. Every refusal is a :class:`ModelNotSetUp` (503)
whose hint says exactly how to set the model up. Weights are never downloaded here.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from kiapi.runtime import pinned
from kiapi.runtime.errors import ModelNotSetUp

WEIGHT_GLOBS = ("model*.safetensors", "weight*.safetensors")


@dataclass(frozen=True)
class WeightSource:
    """How one catalog entry's weights can be found on this machine."""

    repo: str  # Hugging Face repo id, looked up in the local cache
    path: Path | None = None  # explicit folder (KIAPI_MODEL_PATHS)
    package: str | None = None  # import name of a package that carries the folder
    package_dir: str = "model"  # the folder inside that package
    package_install: str | None = None  # how to install that package
    requires: tuple[str, ...] = ()  # importable modules the model's engine needs
    requires_install: str | None = None  # how to install them
    filename: str | None = None  # the one weights file (GGUF) in the folder; None: HF layout

    def holds(self, folder: Path) -> bool:
        """``folder`` has this model's weights."""
        if self.filename is not None:
            return (folder / self.filename).is_file()
        return has_weights(folder)


def has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and bool(weight_files(folder))


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files (the first pattern that matches)."""
    for pattern in WEIGHT_GLOBS:
        if found := sorted(folder.glob(pattern)):
            return found
    return []


def weights_size_gb(folder: Path, filename: str | None = None) -> float:
    files = [folder / filename] if filename else weight_files(folder)
    return sum(path.stat().st_size for path in files) / 1024**3


def hf_cache_folder(repo: str, filename: str = "config.json") -> Path | None:
    """The cached snapshot folder of ``repo`` holding ``filename`` (offline lookup), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found).parent if isinstance(found, str) else None


def package_folder(package: str, subdir: str) -> Path | None:
    """The folder ``subdir`` inside a package pip installed or ``kiapi setup`` fetched."""
    found = pinned.package_folder(package)
    return found / subdir if found is not None else None


def is_importable(name: str) -> bool:
    """A package kiapi may use: installed, or (a pinned wheel) fetched by ``kiapi setup``."""
    if name in pinned.BY_IMPORT:
        return pinned.is_available(name)
    return importlib.util.find_spec(name) is not None


def set_up_hint(name: str, source: WeightSource) -> str:
    ways = []
    if source.package_install:
        ways.append(source.package_install)
    ways.append(
        f"on a machine with network access run `hf download {source.repo}` and copy its "
        "Hugging Face cache folder (~/.cache/huggingface/hub) to this machine, or set HF_HOME "
        "to a copied cache"
    )
    ways.append(
        f"or point KIAPI_MODEL_PATHS at a folder holding the model: "
        f'KIAPI_MODEL_PATHS=\'{{"{name}": "/path/to/{source.repo.split("/")[-1]}"}}\''
    )
    return "; ".join(ways) + "; weights are never downloaded by a request"


def locate(name: str, source: WeightSource) -> Path:
    """The model folder, or :class:`ModelNotSetUp` saying how to set the model up."""
    missing = [m for m in source.requires if not is_importable(m)]
    if missing:
        raise ModelNotSetUp(
            f"model {name!r} needs Python packages that are not installed ({', '.join(missing)})",
            hint=source.requires_install
            or (
                "run `kiapi setup` (it fetches pinned wheels pip cannot install)"
                if all(m in pinned.BY_IMPORT for m in missing)
                else f"install {', '.join(missing)}"
            ),
        )
    if source.path is not None:
        if source.holds(source.path):
            return source.path
        wanted = source.filename or "config.json with *.safetensors weights"
        raise ModelNotSetUp(
            f"model {name!r}: KIAPI_MODEL_PATHS points at {source.path}, which holds no {wanted}",
            hint=f"fix or remove the KIAPI_MODEL_PATHS entry; {set_up_hint(name, source)}",
        )
    candidates = [hf_cache_folder(source.repo, source.filename or "config.json")]
    if source.package:
        candidates.append(package_folder(source.package, source.package_dir))
    for folder in candidates:
        if folder is not None and source.holds(folder):
            return folder
    raise ModelNotSetUp(
        f"model {name!r} is not set up on this server: its weights ({source.repo}) were not "
        "found locally",
        hint=set_up_hint(name, source),
    )


def read_json(folder: Path, name: str) -> dict:
    """``folder/name`` as JSON, or ``{}`` when the file is absent."""
    path = folder / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
