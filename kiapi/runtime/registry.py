"""The model catalog: what each model is, how it is named, and how to load it.

A :class:`ModelSpec` is immutable; the :class:`Registry` maps ``(family, name|alias|repo)`` to
specs. Loading itself belongs to the memory manager, which calls ``spec.loader`` on the worker
thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiapi.runtime.errors import BadRequest


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
    weight_gb: float = 0.0  # estimate used to plan eviction before the model is loaded
    peak_headroom_gb: float = 0.0  # extra memory a running job needs on top of the weights
    priority: int = 0  # lower is evicted first
    ttl_s: float | None = None  # None: the server default; <= 0: pinned (never expires)
    loader: Loader | None = field(default=None, compare=False, repr=False)
    set_up_hint: str | None = None  # how to make the weights available, when they are not

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, self.repo)

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
    def __init__(self, specs: list[ModelSpec] | None = None) -> None:
        self._specs: list[ModelSpec] = []
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
        models = self.models(family)
        return next((s for s in models if s.default), models[0] if models else None)

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
        raise BadRequest(f"unknown {family} model {name!r}; valid choices: {choices}")

    def capability_models(self, family: str, default_name: str | None = None) -> list[dict]:
        """Public catalog entries; ``default_name`` overrides which entry is marked default."""
        effective = default_name or (d.name if (d := self.default(family)) else None)
        return [s.public(is_default=s.name == effective) for s in self.models(family)]
