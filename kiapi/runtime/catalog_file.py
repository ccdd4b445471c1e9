"""The user's catalog file (``KIAPI_MODELS_FILE``, TOML): models kiapi serves besides its own.

Schema — one ``[[models]]`` table per model::

    [[models]]
    name = "bge-small"                 # required: [a-z0-9][a-z0-9._-]*, unique per capability
    path = "/models/bge-small-en-v1.5" # a local folder (or a .gguf file) ...
    # repo = "BAAI/bge-small-en-v1.5"  # ... or a Hugging Face repo id in the local cache
    capability = "embedding"           # embedding | chat | rerank (default: detected)
    aliases = ["bge"]
    default = false                    # make it its capability's default model
    pooling = "cls"                    # cls | mean | max | last (default: modules.json)
    normalize = true                   # default: whether modules.json has a Normalize module
    max_tokens = 512                   # default: sentence_bert_config.json / the tokenizer
    prompts = { query = "Represent this sentence for searching relevant passages: " }
    default_prompt = "query"           # default: config_sentence_transformers.json
    instruction_template = "Instruct: {instruction}\\nQuery:{text}"
    dimensions_min = 64                # Matryoshka models: the smallest truncation allowed
    priority = 0                       # lower is evicted first
    ttl_s = 600                        # idle seconds before unloading (<= 0: pinned)
    weight_gb = 0.2                    # estimate used before the weights can be measured

Whatever an entry leaves out is read from the model's own files (:mod:`kiapi.runtime.detect`)
when its folder is found. A bad entry is reported — with its line and field — and skipped;
every other model still serves. A file that is not valid TOML is refused whole (the message
names the line), and the built-in models still serve.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiapi.runtime.detect import POOLING_MODES, Detected, UnsupportedModel, inspect_model
from kiapi.runtime.engines import REQUIRES
from kiapi.runtime.registry import ModelSpec
from kiapi.runtime.weights import WeightSource, hf_cache_folder

CAPABILITY_NAMES = ("embedding", "chat", "rerank")
FIELD_LINE = re.compile(r"^(?:\[\s*models\.(\w+)\s*\]|([A-Za-z_][\w-]*)\s*=)")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEFAULT_ENGINES = {"embedding": "mlx-embeddings", "chat": "mlx-lm", "rerank": "mlx-cross-encoder"}
FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "path": (str,),
    "repo": (str,),
    "capability": (str,),
    "aliases": (list,),
    "default": (bool,),
    "pooling": (str,),
    "normalize": (bool,),
    "max_tokens": (int,),
    "prompts": (dict,),
    "default_prompt": (str,),
    "instruction_template": (str,),
    "dimensions_min": (int,),
    "priority": (int,),
    "ttl_s": (int, float),
    "weight_gb": (int, float),
}
# Fields only the built-in catalog (builtin_models.toml) may use: it describes models whose
# weights may not be on this machine, so nothing is detected and everything is stated.
BUILTIN_FIELDS: dict[str, tuple[type, ...]] = {
    "engine": (str,),
    "features": (list,),
    "dimensions_max": (int,),
    "peak_headroom_gb": (int, float),
    "extra_requires": (list,),
    "requires_install": (str,),
    "package": (str,),
    "package_dir": (str,),
    "package_install": (str,),
    "filename": (str,),
}


class EntryError(ValueError):
    """One entry is invalid; ``str()`` names the file, the line and the field."""


@dataclass(frozen=True)
class CatalogFile:
    """The specs of a catalog file's valid entries and one message per refused entry."""

    specs: list[ModelSpec]
    problems: list[str]


def read_catalog_file(path: Path, *, builtin: bool = False) -> CatalogFile:
    """Parse and check ``path``; never raises for bad content (see :class:`CatalogFile`).
    ``builtin``: the file is kiapi's own catalog (:data:`BUILTIN_FIELDS` allowed, nothing
    detected, entries marked ``built-in``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return CatalogFile([], [f"{path}: cannot read the catalog file: {exc.strerror or exc}"])
    except UnicodeDecodeError:
        return CatalogFile([], [f"{path}: the catalog file is not UTF-8 text"])
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return CatalogFile([], [f"{path}: not valid TOML: {exc}"])
    extra = sorted(set(document) - {"models"})
    problems = []
    if extra:
        problems.append(f"{path}: unknown top-level key(s) {', '.join(extra)}; use [[models]]")
    entries = document.get("models", [])
    if not isinstance(entries, list):
        return CatalogFile([], [*problems, f"{path}: 'models' must be an array of tables"])
    lines = entry_lines(text)
    specs: list[ModelSpec] = []
    for index, entry in enumerate(entries):
        where = Where(path, lines[index] if index < len(lines) else {})
        try:
            specs.append(
                builtin_spec(entry, where)
                if builtin
                else entry_spec(entry, where, base=path.parent)
            )
        except EntryError as exc:
            problems.append(str(exc))
    return CatalogFile(specs, problems)


def entry_lines(text: str) -> list[dict[str, int]]:
    """For each ``[[models]]`` table in order: field name -> line number (1-based); the key
    ``""`` is the table's header line. A ``[models.prompts]`` sub-table counts as its field."""
    tables: list[dict[str, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if re.match(r"^\[\[\s*models\s*\]\]", stripped):
            tables.append({"": number})
        elif tables and (m := FIELD_LINE.match(stripped)):
            tables[-1].setdefault(m.group(1) or m.group(2), number)
    return tables


@dataclass(frozen=True)
class Where:
    path: Path
    lines: dict[str, int]

    def error(self, field: str | None, message: str) -> EntryError:
        line = self.lines.get(field or "", self.lines.get(""))
        at = f"{self.path}:{line}" if line else str(self.path)
        return EntryError(f"{at}: {'field ' + repr(field) + ': ' if field else ''}{message}")


def check_entry(entry: Any, where: Where, fields: dict[str, tuple[type, ...]]) -> None:
    """The checks every entry passes: known fields, their types, and each field's own rule."""
    if not isinstance(entry, dict):
        raise where.error(None, "each [[models]] entry must be a table")
    for key, value in entry.items():
        if key not in fields:
            raise where.error(key, f"unknown field; fields: {', '.join(fields)}")
        if not isinstance(value, fields[key]) or (
            isinstance(value, bool) and bool not in fields[key]
        ):
            kinds = " or ".join(t.__name__ for t in fields[key])
            raise where.error(key, f"must be {kinds}, not {type(value).__name__}")
    name = entry.get("name")
    if name is None:
        raise where.error(None, "an entry needs a 'name'")
    if not NAME.match(name):
        raise where.error("name", "use lower-case letters, digits, '.', '_' and '-' (<= 64)")
    if ("path" in entry) == ("repo" in entry):
        raise where.error(None, f"entry {name!r} needs exactly one of 'path' or 'repo'")
    aliases = entry.get("aliases", [])
    if not all(isinstance(a, str) and a.strip() for a in aliases):
        raise where.error("aliases", "must be a list of non-empty strings")
    prompts = entry.get("prompts", {})
    if not all(isinstance(v, str) for v in prompts.values()):
        raise where.error("prompts", "must map prompt names to strings")
    capability = entry.get("capability")
    if capability is not None and capability not in CAPABILITY_NAMES:
        raise where.error("capability", f"must be one of {', '.join(CAPABILITY_NAMES)}")
    pooling = entry.get("pooling")
    if pooling is not None and pooling not in POOLING_MODES:
        raise where.error("pooling", f"must be one of {', '.join(POOLING_MODES)}")
    template = entry.get("instruction_template")
    if template is not None and not ("{instruction}" in template and "{text}" in template):
        raise where.error("instruction_template", "must contain {instruction} and {text}")
    for key in ("max_tokens", "dimensions_min", "dimensions_max"):
        if key in entry and entry[key] < 1:
            raise where.error(key, "must be at least 1")
    for key in ("features", "extra_requires"):
        if not all(isinstance(v, str) and v for v in entry.get(key, [])):
            raise where.error(key, "must be a list of non-empty strings")
    if "engine" in entry and entry["engine"] not in REQUIRES:
        raise where.error("engine", f"must be one of {', '.join(REQUIRES)}")


def builtin_spec(entry: Any, where: Where) -> ModelSpec:
    """One entry of kiapi's own catalog: every field stated, nothing read from disk."""
    check_entry(entry, where, FIELDS | BUILTIN_FIELDS)
    for key in ("capability", "engine", "repo"):
        if key not in entry:
            raise where.error(None, f"a built-in entry needs {key!r}")
    source_fields = {
        key: entry[key]
        for key in ("package", "package_dir", "package_install", "requires_install", "filename")
        if key in entry
    }
    source = WeightSource(
        entry["repo"],
        requires=(*REQUIRES[entry["engine"]], *entry.get("extra_requires", [])),
        **source_fields,
    )
    return to_spec(entry, {}, where, capability=entry["capability"], engine=entry["engine"],
                   repo=entry["repo"], source=source, origin="built-in")  # fmt: skip


def entry_spec(entry: Any, where: Where, *, base: Path) -> ModelSpec:
    """One checked entry of a user's file as a :class:`ModelSpec` (fields left out detected
    from the model's files)."""
    check_entry(entry, where, FIELDS)
    name, capability = entry["name"], entry.get("capability")
    if "path" in entry:
        folder = Path(entry["path"]).expanduser()
        folder = folder if folder.is_absolute() else base / folder
        repo = f"local/{name}"
    else:
        repo = entry["repo"]
        folder = hf_cache_folder(repo)  # None until the model is in the local cache
    detected: Detected | None = None
    if folder is not None and folder.exists():
        try:
            detected = inspect_model(folder, capability)
        except UnsupportedModel as exc:
            raise where.error("path" if "path" in entry else "repo", str(exc)) from None
    elif "path" in entry:
        raise where.error("path", f"{folder} does not exist")
    if capability is None:
        if detected is None:
            raise where.error("capability", "cannot be detected before the model is in the "
                              "local cache; set it")  # fmt: skip
        capability = detected.capability
    engine = (
        detected.engine if detected else ("mlx-lm" if capability == "chat" else "mlx-embeddings")
    )
    source = WeightSource(
        repo,
        path=detected.folder if detected and "path" in entry else None,
        requires=REQUIRES[engine],
        filename=detected.filename if detected else None,
    )
    found = {
        "features": detected.features,
        "pooling": detected.pooling,
        "normalize": detected.normalize,
        "prompts": detected.prompts,
        "default_prompt": detected.default_prompt,
    } if detected else {}  # fmt: skip
    line = where.lines.get("")
    origin = f"{where.path}:{line}" if line else str(where.path)
    return to_spec(entry, found, where, capability=capability, engine=engine, repo=repo,
                   source=source, origin=origin)  # fmt: skip


def to_spec(
    entry: dict[str, Any],
    found: dict[str, Any],
    where: Where,
    *,
    capability: str,
    engine: str,
    repo: str,
    source: WeightSource,
    origin: str,
) -> ModelSpec:
    """The spec of a checked entry: each field as the entry states it, else as ``found`` (what
    the model's own files say), else its default."""

    def pick(key: str, default: Any = None) -> Any:
        value = entry.get(key)
        return value if value is not None else found.get(key, default)

    prompts = entry.get("prompts") or found.get("prompts") or {}
    if "default_prompt" in entry and entry["default_prompt"] not in prompts:
        raise where.error("default_prompt", "names no prompt of this model")
    return ModelSpec(
        name=entry["name"],
        family=capability,
        domain="text" if capability == "chat" else capability,
        repo=repo,
        aliases=tuple(entry.get("aliases", [])),
        features=tuple(pick("features", ("text",))),
        default=entry.get("default", False),
        weight_gb=float(entry.get("weight_gb", 0.0)),
        peak_headroom_gb=float(entry.get("peak_headroom_gb", 0.2)),
        priority=entry.get("priority", 0),
        ttl_s=float(entry["ttl_s"]) if "ttl_s" in entry else None,
        engine=engine,
        source=source,
        pooling=pick("pooling"),
        dimensions_min=entry.get("dimensions_min"),
        dimensions_max=entry.get("dimensions_max"),
        normalize=pick("normalize", True),
        max_tokens=entry.get("max_tokens"),
        prompts=tuple(prompts.items()),
        default_prompt=pick("default_prompt"),
        instruction_template=entry.get("instruction_template"),
        origin=origin,
    )


def toml_value(value: Any) -> str:
    """A scalar, list or flat table as TOML (strings as basic strings: JSON escapes are
    TOML escapes)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render_entry(fields: dict[str, Any]) -> str:
    """One ``[[models]]`` table for appending to a catalog file."""
    lines = ["[[models]]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in fields.items() if value is not None]
    return "\n".join(lines) + "\n"
