"""Handlers of ``specs/rerank.json``."""

from __future__ import annotations

from kiapi.handlers import JOB_ID_HEADER, client_disconnected, json_body, runtime
from kiapi.runtime.rerank import RERANK, Limits, parse_request, rerank_job


async def rerank_v1_rerank_post():
    rt = runtime()
    limits = Limits(rt.settings.rerank_max_documents, rt.settings.rerank_max_chars)
    request = parse_request(rt.registry, json_body(), limits)
    rt.require_runnable(request.spec)
    (done,) = await rt.run_sync(
        RERANK,
        [(request.params(), rerank_job(rt.memory, request))],
        client_gone=client_disconnected,
    )
    return {"id": done.job_id, **done.output.result}, 200, {JOB_ID_HEADER: done.job_id}


async def list_models_v1_rerank_models_get():
    return runtime().registry.capability_models(RERANK)
