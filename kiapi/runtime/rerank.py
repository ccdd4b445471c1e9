"""The rerank capability, HTTP-free: request checks, the job body, the response record.

A loaded rerank model (``LoadedModel.model``) provides ``score(query, documents) ->
(scores, tokens)``: one relevance score per document in input order and the tokens of every
query-document pair it read; only the worker thread calls it. Each request is one ``rerank``
job; count and size limits are checked here, before any job exists.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kiapi.runtime.catalog import RERANK
from kiapi.runtime.errors import BadRequest, ModelNotSetUp, PayloadTooLarge
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import ModelSpec, Registry
from kiapi.runtime.worker import JobOutput

NO_RERANKER_HINT = (
    "add a cross-encoder to the catalog file: `kiapi models add /path/to/reranker-folder` "
    "(BERT or XLM-RoBERTa *ForSequenceClassification, Hugging Face layout), then restart"
)


class RerankModel(Protocol):
    def score(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]: ...


@dataclass(frozen=True)
class Limits:
    max_documents: int
    max_chars: int


@dataclass(frozen=True)
class RerankRequest:
    spec: ModelSpec
    query: str
    documents: tuple[str, ...]
    top_n: int | None
    return_documents: bool

    def params(self) -> dict[str, Any]:
        """What the job record keeps: the model and the sizes, never the texts."""
        return {"model": self.spec.name, "documents": len(self.documents), "top_n": self.top_n}


def parse_request(registry: Registry, body: dict[str, Any], limits: Limits) -> RerankRequest:
    """Resolve the model and check the request (the schema has checked the types): 413 for
    too many or too long texts, 400 for empty ones; nothing is tokenized here."""
    documents = body["documents"]
    if len(documents) > limits.max_documents:
        raise PayloadTooLarge(
            f"{len(documents)} documents; at most {limits.max_documents} per request "
            "(KIAPI_RERANK_MAX_DOCUMENTS): split them, or pre-filter with embeddings"
        )
    query = body["query"]
    for where, text in [
        ("query", query),
        *((f"documents[{i}]", d) for i, d in enumerate(documents)),
    ]:
        if len(text) > limits.max_chars:
            raise PayloadTooLarge(
                f"{where} has {len(text)} characters; at most {limits.max_chars} "
                "(KIAPI_RERANK_MAX_CHARS): a cross-encoder reads only its first few hundred tokens"
            )
        if not text.strip():
            raise BadRequest(f"{where} is empty; every text must have content")
    if not registry.models(RERANK):
        raise ModelNotSetUp("no rerank model is set up on this server", hint=NO_RERANKER_HINT)
    spec = registry.resolve(RERANK, body.get("model"))
    top_n = body.get("top_n")
    return RerankRequest(
        spec, query, tuple(documents), int(top_n) if top_n is not None else None,
        bool(body.get("return_documents", False)),
    )  # fmt: skip


def rerank_job(memory: MemoryManager, request: RerankRequest):
    """The job body (worker thread): score every pair, then sort and cut to ``top_n``."""

    def run() -> JobOutput:
        started = time.perf_counter()
        with memory.use(request.spec) as model:
            scores, tokens = model.score(request.query, request.documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.top_n]
        results = []
        for index in order:
            result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
            if request.return_documents:
                result["document"] = {"text": request.documents[index]}
            results.append(result)
        return JobOutput(
            result={
                "model": request.spec.name,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "meta": {"billed_units": {"search_units": 1}},
                "timings": {"rerank_s": time.perf_counter() - started},
            }
        )

    return run
