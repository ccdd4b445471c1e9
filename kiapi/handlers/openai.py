"""Handlers of ``specs/openai.json``: the OpenAI-compatible embeddings and model list."""

from __future__ import annotations

import time

from kiapi.handlers import client_disconnected, job_headers, json_body, runtime
from kiapi.runtime.catalog import CHAT, EMBEDDING
from kiapi.runtime.embedding import EmbeddingItem, embedding_job
from kiapi.runtime.errors import NotFound, excerpt
from kiapi.runtime.openai_compat import embeddings_response, parse_openai_request

OPENAI_FAMILIES = (EMBEDDING, CHAT)  # what /v1/models lists: the families OpenAI clients call


async def create_embeddings_v1_embeddings_post():
    body = json_body()
    received = time.perf_counter()
    rt = runtime()
    request = parse_openai_request(rt.registry, body)
    rt.require_runnable(request.spec)
    jobs = [
        (
            {"model": request.spec.name, "text": text},
            embedding_job(
                rt.memory,
                request.spec,
                EmbeddingItem(
                    text=text, truncate=request.truncate, normalize=request.spec.normalize
                ),
                received,
            ),
        )
        for text in request.texts
    ]
    done = await rt.run_sync(EMBEDDING, jobs, client_gone=client_disconnected)
    headers = job_headers([d.job_id for d in done])
    return embeddings_response(request, [d.output for d in done]), 200, headers


def _servable(rt) -> list[dict]:
    return [entry for family in OPENAI_FAMILIES for entry in rt.servable_models(family)]


async def list_models_v1_models_get():
    return {"object": "list", "data": _servable(runtime())}


async def retrieve_model_v1_models__model__get(model: str):
    rt = runtime()
    spec = rt.registry.find(model)  # the names and aliases requests use
    for entry in _servable(rt) if spec is not None else []:
        if entry["id"] == spec.name:
            return entry
    raise NotFound(f"no servable model {excerpt(model)}; GET /v1/models lists them", param="model")
