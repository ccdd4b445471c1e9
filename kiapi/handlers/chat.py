"""Handlers of ``specs/chat.json``: OpenAI's Chat Completions, plain and streamed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from kiapi.handlers import JOB_ID_HEADER, client_disconnected, json_body, runtime
from kiapi.http.errors import openai_error_body
from kiapi.runtime.chat import CHAT, ChatItem, chat_job, parse_chat_request, prepare
from kiapi.runtime.errors import KiapiError
from kiapi.runtime.streams import Channel


async def create_chat_completion_v1_chat_completions_post():
    received = time.perf_counter()
    rt = runtime()
    request = parse_chat_request(rt.registry, json_body(), rt.settings.chat_max_tokens)
    rt.require_runnable(request.spec)
    resident = rt.memory.peek(request.spec)
    prepared = await run_in_threadpool(prepare, resident, request) if resident else None
    item = ChatItem(request, Channel(), received, prepared)
    body = chat_job(rt.memory, rt.jobs, item)
    if not request.stream:
        (done,) = await rt.run_sync(
            CHAT, [(request.params(), body)], client_gone=client_disconnected
        )
        headers = {JOB_ID_HEADER: done.job_id, "Content-Type": "application/json"}
        return _completion(done.job_id, done.output.result), 200, headers
    job = rt.submit(CHAT, request.params(), body)
    return StreamingResponse(
        _events(rt, job, item),
        media_type="text/event-stream",
        headers={JOB_ID_HEADER: job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _completion(job_id: str, result: dict) -> dict:
    return {
        "id": f"chatcmpl-{job_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result["model"],
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": result["message"],
                "logprobs": None,
                "finish_reason": result["finish_reason"],
            }
        ],
        "usage": result["usage"],
        "timings": result["timings"],
    }


async def _events(rt, job, item: ChatItem) -> AsyncIterator[bytes]:
    """The stream: a role chunk, a chunk per text delta, the finish chunk (and usage), then
    ``[DONE]``; an error once started is one OpenAI error event. Leaving early (the client
    disconnected: Starlette cancels this generator) stops the job at its next step."""
    created = int(time.time())
    model = item.request.spec.name

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        choices = (
            [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        )
        data = {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None or item.request.include_usage:
            data["usage"] = usage
        return _sse(data)

    future = asyncio.wrap_future(job.future)
    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            getter = asyncio.ensure_future(item.channel.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                _kind, text = getter.result()
                yield chunk({"content": text})
                continue
            getter.cancel()
            while (event := item.channel.get_nowait()) is not None:  # deltas before the end
                yield chunk({"content": event[1]})
            break
        finished = True
        try:
            result = future.result().result
        except KiapiError as exc:
            yield _sse(openai_error_body(exc))
        else:
            yield chunk({}, result["finish_reason"])
            if item.request.include_usage:
                yield chunk({}, usage=result["usage"])
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client left (or the server stops): end the generation
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            rt.stop_job(job)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def list_models_v1_chat_models_get():
    return runtime().registry.capability_models(CHAT)
