"""Handlers of ``specs/embedding.json``."""

from __future__ import annotations

from kiapi.handlers import runtime
from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.embedding import parse_request, run_embedding
from kiapi.runtime.memory import require_set_up


async def embedding_v1_embedding_post(body: dict):
    rt = runtime()
    spec, item = parse_request(rt.registry, body)
    require_set_up(spec)  # answer 503 at once instead of queueing a job that cannot run
    params = {"model": spec.name, "text": item.text, "image": item.image}
    output = await rt.run_sync(EMBEDDING, params, lambda: run_embedding(rt.memory, spec, item))
    return output.result


async def list_models_v1_embedding_models_get():
    return runtime().registry.capability_models(EMBEDDING)
