"""Handlers of ``specs/embedding.json``."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool

from kiapi.handlers import JOB_ID_HEADER, client_disconnected, json_body, runtime
from kiapi.runtime.catalog import EMBEDDING
from kiapi.runtime.embedding import EmbeddingItem, embedding_job, parse_request


async def embedding_v1_embedding_post():
    body = json_body()
    received = time.perf_counter()
    rt = runtime()
    request = parse_request(rt.registry, body)
    rt.require_runnable(request.spec)
    image = None
    if request.image is not None:  # fetching and decoding an image is blocking I/O
        image = await run_in_threadpool(rt.images.load, request.image)
    item = EmbeddingItem(text=request.text, image=image, truncate=request.truncate)
    (done,) = await rt.run_sync(
        EMBEDDING,
        [(request.params(), embedding_job(rt.memory, request.spec, item, received))],
        client_gone=client_disconnected,
    )
    return done.output.result, 200, {JOB_ID_HEADER: done.job_id}


async def list_models_v1_embedding_models_get():
    return runtime().registry.capability_models(EMBEDDING)
