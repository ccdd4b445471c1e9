"""The embedding capability, HTTP-free: request checks, the job body, the response record.

A loaded embedding model (what the catalog entry's loader returns as ``LoadedModel.model``)
provides ``embed(items) -> vectors``, one vector per item, in order; only the worker thread
calls it.

Every request is its own ``embedding`` job; :func:`embedding_job` makes it
:class:`~kiapi.runtime.worker.Batchable`, so the worker runs the queued requests for one model
in a single ``embed`` call (see :func:`run_embedding_batch`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.errors import BadRequest, excerpt
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import ModelSpec, Registry
from kiapi.runtime.worker import Batchable, JobOutput

if TYPE_CHECKING:
    from PIL.Image import Image

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked request: the resolved model, the inputs (the text with its prompt or
    instruction applied) and whether a too-long text may be truncated."""

    spec: ModelSpec
    text: str | None = None
    image: str | None = None
    truncate: bool = True

    def params(self) -> dict[str, Any]:
        """What the job record keeps (the job store redacts inline image data)."""
        return {"model": self.spec.name, "text": self.text, "image": self.image}


def with_prompt(spec: ModelSpec, text: str, body: dict[str, Any]) -> str:
    """``text`` as the model should see it: after the named prompt (``prompt_name``, else the
    model's default prompt), or inside its instruction template (``instruction``). Raises
    BadRequest for a prompt the model does not have, or an instruction it cannot take."""
    prompt_name, instruction = body.get("prompt_name"), body.get("instruction")
    if prompt_name is not None and instruction is not None:
        raise BadRequest(
            "send either 'prompt_name' or 'instruction', not both", param="prompt_name"
        )
    if instruction is not None:
        if spec.instruction_template is None:
            raise BadRequest(
                f"model {spec.name!r} takes no instruction"
                + (
                    f"; its named prompts: {', '.join(n for n, _ in spec.prompts)}"
                    if spec.prompts
                    else ""
                ),
                param="instruction",
            )
        template = spec.instruction_template
        head, _, tail = template.partition("{text}")
        return (
            head.replace("{instruction}", instruction)
            + text
            + tail.replace("{instruction}", instruction)
        )
    name = prompt_name if prompt_name is not None else spec.default_prompt
    if name is None:
        return text
    prompt = spec.prompt(name)
    if prompt is None:
        names = ", ".join(n for n, _ in spec.prompts) or "none"
        raise BadRequest(
            f"model {spec.name!r} has no prompt named {excerpt(name)} (its prompts: {names})",
            param="prompt_name",
        )
    return prompt + text


@dataclass(frozen=True)
class EmbeddingItem:
    """One item ready for a model: text (its prompt or instruction already applied) and/or a
    decoded RGB image. ``truncate`` False: a text over the model's limit is refused (400)
    rather than cut; ``normalize`` False: the pooled vector is returned as the model's
    pipeline makes it (a model without a Normalize module), not scaled to unit length."""

    text: str | None = None
    image: Image | None = None
    truncate: bool = True
    normalize: bool = True


@dataclass(frozen=True)
class EmbeddingVector:
    """One item's vector (float32, as the model computes it) and the tokens it embedded.

    Results keep vectors as float32 arrays: the response serialiser prints each value with the
    shortest float32 representation (half the bytes of float64 reprs, no precision lost).
    """

    vector: np.ndarray | Sequence[float]
    prompt_tokens: int


class EmbeddingModel(Protocol):
    def embed(self, items: Sequence[EmbeddingItem]) -> list[EmbeddingVector | Exception]: ...


def parse_request(registry: Registry, body: dict[str, Any]) -> EmbeddingRequest:
    """Resolve the model and check the inputs; raises BadRequest (400) with the reason.

    kiapi's extension fields (specs/additions/embedding.json): ``truncate``, ``prompt_name``
    and ``instruction``. Other fields are accepted and ignored (the contract's schema allows
    them).
    """
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
    if "text" in given:
        given["text"] = with_prompt(spec, given["text"], body)
    elif body.get("prompt_name") is not None or body.get("instruction") is not None:
        raise BadRequest("'prompt_name' and 'instruction' apply to 'text' input only")
    return EmbeddingRequest(spec, **given, truncate=wants_truncation(body))


def wants_truncation(body: dict[str, Any]) -> bool:
    """The ``truncate`` extension field: anything but an explicit false truncates."""
    return body.get("truncate", True) is not False


def l2_normalize(vector: np.ndarray | Sequence[float]) -> np.ndarray:
    """The vector as float32, scaled to unit L2 norm (a zero vector stays zero)."""
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / np.float32(norm) if norm > 0 else vector


CHARS_PER_TOKEN = 4  # English averages ~4 characters per token
IMAGE_TOKEN_ESTIMATE = 256


def estimated_tokens(item: EmbeddingItem) -> int:
    """An item's share of the batch token budget, estimated without tokenising."""
    text = len(item.text) // CHARS_PER_TOKEN + 2 if item.text else 0
    return text + (IMAGE_TOKEN_ESTIMATE if item.image is not None else 0)


def embedding_job(
    memory: MemoryManager, spec: ModelSpec, item: EmbeddingItem, received: float
) -> Batchable:
    """The job body for one request; the worker batches it with queued requests for ``spec``.

    ``received`` is the ``time.perf_counter()`` reading taken when the request arrived, so
    ``timings.total_s`` is the whole server-side time (queue wait, loading, embedding).
    """
    return Batchable(
        key=(EMBEDDING, spec.name),
        item=(item, received),
        run_batch=functools.partial(run_embedding_batch, memory, spec),
        cost=estimated_tokens(item),
        ready_now=functools.partial(memory.ready, spec),
    )


def run_embedding_batch(
    memory: MemoryManager, spec: ModelSpec, members: Sequence[tuple[EmbeddingItem, float]]
) -> list[JobOutput | Exception]:
    """The batch body (worker thread): one ``embed`` call for every member, one outcome each.

    If the batched call fails, each item is embedded alone, so a bad item fails only its own
    job. Failing to get the model (not set up, over budget) fails every member.
    """
    items = [item for item, _ in members]
    started = time.perf_counter()
    with memory.use(spec) as model:
        try:
            vectors: list[EmbeddingVector | Exception] = list(model.embed(items))
        except Exception:
            if len(items) == 1:
                raise
            vectors = [_embed_alone(model, item) for item in items]
    finished = time.perf_counter()
    outcomes: list[JobOutput | Exception] = []
    for (item, received), out in zip(members, vectors, strict=True):
        if isinstance(out, Exception):
            outcomes.append(out)
            continue
        vector = l2_normalize(out.vector) if item.normalize else np.asarray(out.vector, np.float32)
        outcomes.append(
            JobOutput(
                result={
                    "model": spec.name,
                    "embedding": vector,
                    "dimension": len(vector),
                    "usage": {
                        "prompt_tokens": out.prompt_tokens,
                        "total_tokens": out.prompt_tokens,
                    },
                    "timings": {
                        "total_s": finished - received,
                        "queue_s": started - received,
                        "embed_s": finished - started,
                        "batch_size": len(items),
                    },
                }
            )
        )
    return outcomes


def _embed_alone(model: EmbeddingModel, item: EmbeddingItem) -> EmbeddingVector | Exception:
    try:
        (out,) = model.embed([item])
        return out
    except Exception as exc:  # this item's own failure, reported on its own job
        return exc
