"""Memory manager: keeps models resident under a global GB budget.

Rules (modelled on Ollama's scheduler):

* ``acquire`` loads a model if it is not resident, first evicting idle residents in ascending
  ``(priority, last_used)`` order until ``other residents + weight + peak headroom <= budget``.
  The eviction plan is made before anything is evicted: if the model cannot fit even with every
  evictable resident gone (alone over budget, or blocked by models in use) it raises
  :class:`BudgetExceeded` and evicts nothing.
* A model in use (between ``acquire`` and ``release``) is never evicted.
* Idle TTL: a resident idle for ``ttl_s`` is evicted by :meth:`sweep`; ``ttl_s <= 0`` pins it
  (reported as ``ttl_s: null``).

Thread ownership: only the worker thread calls :meth:`acquire`, :meth:`release`,
:meth:`sweep`, :meth:`use`, :meth:`ready` and :meth:`unload_all` (they run loaders and
unloaders, i.e. MLX). :meth:`snapshot` may be called from any thread. The loader and the
clock are injected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kiapi.runtime import engines
from kiapi.runtime.errors import BudgetExceeded
from kiapi.runtime.registry import LoadedModel, ModelSpec

log = logging.getLogger(__name__)


def load_with_spec_loader(spec: ModelSpec) -> LoadedModel:
    """The production loader: the catalog entry's engine, or 503 if it is not set up."""
    return engines.load(spec)


@dataclass
class _Resident:
    spec: ModelSpec
    loaded: LoadedModel
    last_used: float
    in_use: int = 0
    working_gb: float = 0.0  # reserved for running requests (KV caches) while in use

    @property
    def held_gb(self) -> float:
        return self.loaded.weight_gb + self.working_gb


class MemoryManager:
    def __init__(
        self,
        budget_gb: float,
        *,
        default_ttl_s: float,
        loader: Callable[[ModelSpec], LoadedModel] = load_with_spec_loader,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget_gb <= 0:
            raise ValueError("budget_gb must be > 0")
        self.budget_gb = budget_gb
        self.default_ttl_s = default_ttl_s
        self._loader = loader
        self._clock = clock
        self._residents: dict[str, _Resident] = {}
        self._lock = threading.Lock()  # guards _residents for snapshot() readers
        self.evictions: Counter[str] = Counter()  # reason -> count

    # -- policy ---------------------------------------------------------------------------
    def ttl_of(self, spec: ModelSpec) -> float | None:
        """Effective idle TTL in seconds; None when pinned."""
        ttl = self.default_ttl_s if spec.ttl_s is None else spec.ttl_s
        return ttl if ttl > 0 else None

    def _plan_room(self, spec: ModelSpec, need_gb: float) -> list[_Resident]:
        """Residents to evict so that ``need_gb`` fits beside the rest; raises if impossible."""
        others = [r for name, r in self._residents.items() if name != spec.name]
        if need_gb > self.budget_gb:
            raise BudgetExceeded(
                f"model {spec.name!r} needs {need_gb:.2f} GB (weights + peak headroom), more than "
                f"the whole memory budget of {self.budget_gb:.2f} GB",
                hint="raise KIAPI_MEMORY_LIMIT_GB if the machine has the memory, "
                "or use a smaller model",
            )
        used = sum(r.held_gb for r in others)
        victims: list[_Resident] = []
        for resident in sorted(
            (r for r in others if r.in_use == 0),
            key=lambda r: (r.spec.priority, r.last_used),
        ):
            if used + need_gb <= self.budget_gb:
                break
            victims.append(resident)
            used -= resident.held_gb
        if used + need_gb > self.budget_gb:
            busy = ", ".join(sorted(r.spec.name for r in others if r.in_use))
            raise BudgetExceeded(
                f"model {spec.name!r} needs {need_gb:.2f} GB but only "
                f"{self.budget_gb - used:.2f} GB of the {self.budget_gb:.2f} GB budget can be freed"
                + (f" (in use: {busy})" if busy else ""),
                hint="retry when the running job is done, or raise KIAPI_MEMORY_LIMIT_GB",
                retry_after_s=5,
            )
        return victims

    # -- worker thread --------------------------------------------------------------------
    def acquire(self, spec: ModelSpec) -> Any:
        """Make ``spec`` resident and mark it in use; returns the loaded model object."""
        self.sweep()
        resident = self._residents.get(spec.name)
        weight = resident.loaded.weight_gb if resident else spec.estimated_weight_gb()
        for victim in self._plan_room(spec, weight + spec.peak_headroom_gb):
            self._evict(victim.spec.name, "budget")
        if resident is None:
            log.info(
                "loading model %s (%s)",
                spec.name,
                spec.repo,
                extra={"event": "model_loading", "model": spec.name},
            )
            started = self._clock()
            loaded = self._loader(spec)
            resident = _Resident(spec, loaded, last_used=self._clock())
            with self._lock:
                self._residents[spec.name] = resident
            seconds = self._clock() - started
            log.info(
                "loaded model %s: %.3f GB in %.2f s",
                spec.name,
                loaded.weight_gb,
                seconds,
                extra={
                    "event": "model_loaded",
                    "model": spec.name,
                    "weight_gb": loaded.weight_gb,
                    "seconds": seconds,
                },
            )
            try:  # the measured weight may exceed the estimate: make room again or give up
                for victim in self._plan_room(spec, loaded.weight_gb + spec.peak_headroom_gb):
                    self._evict(victim.spec.name, "budget")
            except BudgetExceeded:
                self._evict(spec.name, "over_budget_after_load")
                raise
        resident.in_use += 1
        resident.last_used = self._clock()
        return resident.loaded.model

    def release(self, spec: ModelSpec) -> None:
        resident = self._residents.get(spec.name)
        if resident is None or resident.in_use == 0:
            raise RuntimeError(f"release of {spec.name!r} without acquire")
        resident.in_use -= 1
        resident.last_used = self._clock()

    def reserve(self, spec: ModelSpec, gb: float, what: str) -> None:
        """Add ``gb`` of working memory (a request's KV cache) to an acquired model, evicting
        idle residents if needed; :class:`BudgetExceeded` (503, saying ``what`` needed how
        much) when it cannot fit."""
        resident = self._residents.get(spec.name)
        if resident is None or resident.in_use == 0:
            raise RuntimeError(f"reserve for {spec.name!r} without acquire")
        need = resident.held_gb + spec.peak_headroom_gb + gb
        try:
            victims = self._plan_room(spec, need)
        except BudgetExceeded as exc:
            raise BudgetExceeded(
                f"{what} needs {gb:.3f} GB beside {spec.name!r}'s "
                f"{resident.held_gb:.3f} GB in use: {exc.detail}",
                hint="ask for fewer max_tokens, retry when running requests are done, or raise "
                "KIAPI_MEMORY_LIMIT_GB",
                retry_after_s=5,
            ) from None
        for victim in victims:
            self._evict(victim.spec.name, "budget")
        resident.working_gb += gb

    def unreserve(self, spec: ModelSpec, gb: float) -> None:
        resident = self._residents.get(spec.name)
        if resident is not None:
            resident.working_gb = max(0.0, resident.working_gb - gb)

    @contextmanager
    def use(self, spec: ModelSpec) -> Iterator[Any]:
        """``with memory.use(spec) as model:`` — acquire, then release however the block ends."""
        model = self.acquire(spec)
        try:
            yield model
        finally:
            self.release(spec)

    def ready(self, spec: ModelSpec) -> bool:
        """Whether :meth:`acquire` of ``spec`` would neither load nor evict anything now:
        ``spec`` resident, no resident past its TTL (``acquire`` sweeps first), and room for
        ``spec`` beside the others. Work that may run inside another job's step asks this: a
        load or an unload there would stall that job's every stream."""
        resident = self._residents.get(spec.name)
        if resident is None or self._expired():
            return False
        try:
            need = resident.loaded.weight_gb + spec.peak_headroom_gb
            return not self._plan_room(spec, need)
        except BudgetExceeded:
            return False

    def _expired(self) -> list[str]:
        """Idle residents whose TTL has passed."""
        now = self._clock()
        return [
            name
            for name, r in self._residents.items()
            if r.in_use == 0
            and (ttl := self.ttl_of(r.spec)) is not None
            and now - r.last_used >= ttl
        ]

    def sweep(self) -> list[str]:
        """Evict idle residents whose TTL has passed; returns their names."""
        expired = self._expired()
        for name in expired:
            self._evict(name, "ttl")
        return expired

    def unload_all(self, reason: str = "shutdown") -> None:
        for name in [n for n, r in self._residents.items() if r.in_use == 0]:
            self._evict(name, reason)

    def _evict(self, name: str, reason: str) -> None:
        with self._lock:
            resident = self._residents.pop(name)
        self.evictions[reason] += 1
        log.info(
            "evicting model %s (%.3f GB): %s",
            name,
            resident.loaded.weight_gb,
            reason,
            extra={
                "event": "model_evicted",
                "model": name,
                "reason": reason,  # ttl, budget, over_budget_after_load, shutdown
                "weight_gb": resident.loaded.weight_gb,
            },
        )
        if resident.loaded.unload is not None:
            resident.loaded.unload()

    # -- any thread -----------------------------------------------------------------------
    def peek(self, spec: ModelSpec) -> Any | None:
        """The loaded model object if ``spec`` is resident, else None; nothing is loaded or
        marked in use (for work that reads only what never changes once loaded, such as a
        tokenizer, off the worker thread)."""
        with self._lock:
            resident = self._residents.get(spec.name)
        return resident.loaded.model if resident is not None else None

    def is_resident(self, name: str) -> bool:
        with self._lock:
            return name in self._residents

    def snapshot(self) -> dict[str, Any]:
        """The ``MemoryStats`` shape served by ``/health``."""
        now = self._clock()
        with self._lock:
            residents = list(self._residents.values())
        loaded = []
        for r in residents:
            ttl = self.ttl_of(r.spec)
            idle = 0.0 if r.in_use else max(0.0, now - r.last_used)
            loaded.append(
                {
                    "name": r.spec.name,
                    "family": r.spec.family,
                    "domain": r.spec.domain,
                    "repo": r.spec.repo,
                    "weight_gb": r.loaded.weight_gb,
                    "priority": r.spec.priority,
                    "idle_s": idle,
                    "ttl_s": ttl,
                    "expires_in_s": None if ttl is None else max(0.0, ttl - idle),
                }
            )
        return {
            "loaded": loaded,
            "resident_gb": sum(r.held_gb for r in residents),
            "budget_gb": self.budget_gb,
        }
