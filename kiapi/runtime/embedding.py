"""The embedding capability, HTTP-free: request checks, the job body, the response record.

A loaded embedding model (what the catalog entry's loader returns as ``LoadedModel.model``)
must provide ``embed(item: EmbeddingItem) -> EmbeddingVector``; only the worker thread calls it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.errors import BadRequest
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import ModelSpec, Registry
from kiapi.runtime.worker import JobOutput

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class EmbeddingItem:
    text: str | None = None
    image: str | None = None  # as the client sent it; decoding belongs to the model's engine


@dataclass(frozen=True)
class EmbeddingVector:
    vector: list[float]
    prompt_tokens: int


class EmbeddingModel(Protocol):
    def embed(self, item: EmbeddingItem) -> EmbeddingVector: ...


def parse_request(registry: Registry, body: dict[str, Any]) -> tuple[ModelSpec, EmbeddingItem]:
    """Resolve the model and check the inputs; raises BadRequest (400) with the reason."""
    spec = registry.resolve(EMBEDDING, body.get("model"))
    given = {m: body.get(m) for m in MODALITIES if body.get(m) not in (None, "")}
    if not given:
        raise BadRequest(
            "provide at least one non-empty input: "
            + " or ".join(f"'{m}'" for m in MODALITIES if m in spec.features)
        )
    unsupported = [m for m in given if m not in spec.features]
    if unsupported:
        raise BadRequest(
            f"model {spec.name!r} does not accept {', '.join(unsupported)} input "
            f"(it accepts: {', '.join(spec.features)}); "
            "choose a multimodal model from GET /v1/embedding/models"
        )
    return spec, EmbeddingItem(**given)


def l2_normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else list(vector)


def run_embedding(memory: MemoryManager, spec: ModelSpec, item: EmbeddingItem) -> JobOutput:
    """The job body (worker thread): acquire the model, embed, and build the response record."""
    started = time.perf_counter()
    with memory.use(spec) as model:
        out = model.embed(item)
    vector = l2_normalize(out.vector)
    return JobOutput(
        result={
            "model": spec.name,
            "embedding": vector,
            "dimension": len(vector),
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
            "timings": {"total_s": time.perf_counter() - started},
        }
    )
