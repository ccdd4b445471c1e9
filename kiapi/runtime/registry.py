"""The model catalog: what each model is, how it is named, and how to load it.

A :class:`ModelSpec` is immutable; the :class:`Registry` maps ``(family, name|alias|repo)`` to
specs. Loading itself belongs to the memory manager, which calls the loader of
``spec.engine`` (``kiapi.runtime.engines``) on the worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiapi.runtime.errors import BadRequest, ModelNotSetUp, UnknownModel, excerpt
from kiapi.runtime.weights import WeightSource, locate, weights_size_gb


@dataclass
class LoadedModel:
    """A resident model as the loader hands it to the memory manager.

    ``weight_gb`` is the measured resident size; ``unload`` frees the memory for real (for MLX:
    drop the arrays and clear the MLX cache) and is called on the worker thread.
    """

    model: Any
    weight_gb: float
    unload: Callable[[], None] | None = None


Loader = Callable[["ModelSpec"], LoadedModel]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    domain: str
    repo: str
    aliases: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    default: bool = False
    weight_gb: float = 0.0  # catalog estimate, for when the weight files cannot be measured
    peak_headroom_gb: float = 0.0  # extra memory a running job needs on top of the weights
    priority: int = 0  # lower is evicted first
    ttl_s: float | None = None  # None: the server default; <= 0: pinned (never expires)
    engine: str | None = None  # its engine in kiapi.runtime.engines.ENGINES (None: cannot load)
    set_up_hint: str | None = None  # how to make the model available, when it has no engine
    source: WeightSource | None = None  # where its weights are found (None: the loader knows)
    pooling: str | None = None  # embedding models: "mean" or "last" (token)
    dimensions_min: int | None = None  # smallest truncation (Matryoshka); None: cannot truncate
    dimensions_max: int | None = None  # the model's vector length, when the catalog knows it
    normalize: bool = True  # embedding models: its pipeline ends in an L2 Normalize module
    max_tokens: int | None = None  # embedding models: longest input; None: from its files
    prompts: tuple[tuple[str, str], ...] = ()  # embedding models: named prompts (prefixes)
    default_prompt: str | None = None  # the prompt applied when a request names none
    instruction_template: str | None = None  # with {instruction} and {text} (Qwen3-Embedding)
    origin: str = "built-in"  # where the entry comes from: built-in, or file:line

    def prompt(self, name: str) -> str | None:
        """The text of the named prompt, or None if the model has no such prompt."""
        return dict(self.prompts).get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, self.repo)

    def require_set_up(self) -> None:
        """Raise :class:`ModelNotSetUp` (503, with how to fix it) unless the model can load."""
        if self.engine is None:
            raise ModelNotSetUp(
                f"model {self.name!r} is not set up on this server",
                hint=self.set_up_hint or f"make the weights of {self.repo} available locally",
            )
        if self.source is not None:
            locate(self.name, self.source)

    def estimated_weight_gb(self) -> float:
        """Before loading: the size of the weight files found on disk, else the estimate."""
        if self.source is not None:
            try:
                return weights_size_gb(locate(self.name, self.source), self.source.filename)
            except ModelNotSetUp:
                pass
        return self.weight_gb

    def weights_folder(self) -> Path | None:
        """Where its weights are on this machine (None: not set up, or the loader knows)."""
        if self.source is None:
            return None
        try:
            return locate(self.name, self.source)
        except ModelNotSetUp:
            return None

    def is_set_up(self) -> bool:
        try:
            self.require_set_up()
        except ModelNotSetUp:
            return False
        return True

    def public(self, *, is_default: bool) -> dict[str, Any]:
        """The ``CapabilityModelSpec`` shape served by ``GET /v1/<family>/models``."""
        return {
            "name": self.name,
            "family": self.family,
            "domain": self.domain,
            "aliases": list(self.aliases),
            "default": is_default,
            "features": list(self.features),
        }


class Registry:
    """The catalog, plus each family's effective default (see :meth:`choose_default`)."""

    def __init__(self, specs: list[ModelSpec] | None = None) -> None:
        self._specs: list[ModelSpec] = []
        self._defaults: dict[str, ModelSpec] = {}
        self.problems: list[str] = []  # catalog entries refused when it was built
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: ModelSpec) -> None:
        for other in self._specs:
            if other.family == spec.family and set(other.names) & set(spec.names):
                clash = sorted(set(other.names) & set(spec.names))
                raise ValueError(f"{spec.name}: names {clash} already used by {other.name}")
        self._specs.append(spec)

    def models(self, family: str) -> list[ModelSpec]:
        """The family's models, in catalog order."""
        return [s for s in self._specs if s.family == family]

    def default(self, family: str) -> ModelSpec | None:
        """The effective default if one was chosen, else the catalog's default entry."""
        if family in self._defaults:
            return self._defaults[family]
        models = self.models(family)
        return next((s for s in models if s.default), models[0] if models else None)

    def choose_default(self, family: str, preferred: str | None = None) -> str | None:
        """Fix the family's effective default for this process; returns a note if it moved.

        ``preferred`` (a name, alias or repo; else the catalog's default entry) is used when it
        is set up; otherwise the first set-up model in catalog order serves instead. If none is
        set up the preferred one stays default (requests then answer 503 with its set-up hint).
        Raises ValueError for an unknown ``preferred``.
        """
        try:
            wanted = self.resolve(family, preferred) if preferred else self.default(family)
        except BadRequest as exc:
            raise ValueError(f"KIAPI_{family.upper()}_DEFAULT_MODEL: {exc.detail}") from None
        if wanted is None:
            return None
        chosen = wanted
        if not wanted.is_set_up():
            chosen = next((s for s in self.models(family) if s.is_set_up()), wanted)
        self._defaults[family] = chosen
        if chosen is wanted:
            return None
        return (
            f"default {family} model {wanted.name!r} is not set up; {chosen.name!r} serves as the "
            f"default instead (set up {wanted.name!r} or set KIAPI_{family.upper()}_DEFAULT_MODEL)"
        )

    def find(self, name: str) -> ModelSpec | None:
        """A model of any family by name, alias or repo (case-insensitive)."""
        wanted = name.strip().lower()
        return next((s for s in self._specs if wanted in (n.lower() for n in s.names)), None)

    def resolve(self, family: str, name: str | None) -> ModelSpec:
        """Find a model by name, alias or repo (case-insensitive); ``None`` means the default."""
        models = self.models(family)
        if name is None:
            spec = self.default(family)
            if spec is None:
                raise BadRequest(f"no {family} models are registered")
            return spec
        wanted = name.strip().lower()
        for spec in models:
            if wanted in (n.lower() for n in spec.names):
                return spec
        choices = ", ".join(
            f"{s.name} (aliases: {', '.join(s.aliases)})" if s.aliases else s.name for s in models
        )
        raise UnknownModel(
            f"unknown {family} model {excerpt(name)}; valid choices: {choices}", param="model"
        )

    def capability_models(self, family: str) -> list[dict]:
        """Public catalog entries, the effective default marked ``default: true``."""
        effective = self.default(family)
        return [s.public(is_default=s is effective) for s in self.models(family)]
