"""Chat completions: request checks, the prompt, the streamed text, and the worker's runner.

Request side (any thread): :func:`parse_chat_request` turns an OpenAI-shaped body into a
:class:`ChatRequest` (limits checked before any job: at most ``MAX_MESSAGES`` messages, ``n``
1, at most 4 stop strings). :func:`prepare` renders the model's chat template and tokenizes
when the model is resident (the handler runs it in a thread); otherwise the runner does it
when the job joins.

Worker side: :class:`ChatRunner` is one model's :class:`~kiapi.runtime.worker.StepRunner`.
It holds the model in use for as long as a member is generating (so it is never evicted
under a live stream), admits each member's KV cache (prompt + ``max_tokens`` tokens) against
the memory budget or fails it with a 503 that says why, and turns each decode step into text
deltas for the member's :class:`~kiapi.runtime.streams.Channel`, cutting stop strings
exactly (no part of a stop string is ever sent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiapi.runtime.catalog import CHAT
from kiapi.runtime.errors import BadRequest, JobCanceled, excerpt
from kiapi.runtime.jobs import Job, JobStore
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import ModelSpec
from kiapi.runtime.streams import Channel
from kiapi.runtime.worker import JobOutput, Joinable

ROLES = frozenset({"system", "user", "assistant", "developer"})
MAX_MESSAGES = 512
MAX_STOP = 4
DEFAULT_MAX_TOKENS = 1024
SUMMARY_CHARS = 200  # a job record keeps this much of each message


@dataclass(frozen=True)
class ChatRequest:
    spec: ModelSpec
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    max_tokens_limit: int = DEFAULT_MAX_TOKENS

    def params(self) -> dict[str, Any]:
        """What the job record keeps: long message contents summarised."""
        return {
            "model": self.spec.name,
            "messages": [
                {"role": m["role"], "content": _summary(m["content"])} for m in self.messages
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
            "stream": self.stream,
        }


def _summary(text: str) -> str:
    if len(text) <= SUMMARY_CHARS:
        return text
    return f"{text[:SUMMARY_CHARS]}… ({len(text)} characters)"


def parse_chat_request(
    registry, body: dict[str, Any], max_tokens_limit: int = DEFAULT_MAX_TOKENS
) -> ChatRequest:
    """The request, or :class:`BadRequest` (400) for what the schema cannot say.
    ``max_tokens_limit``: the server's cap on one completion (``KIAPI_CHAT_MAX_TOKENS``)."""
    spec = registry.resolve(CHAT, body.get("model"))
    messages = tuple(_message(i, m) for i, m in enumerate(body["messages"]))
    if not messages:
        raise BadRequest("'messages' is empty: send at least one message", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"at most {MAX_MESSAGES} messages per request", param="messages")
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported: send one request per completion", param="n")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and int(max_tokens) > max_tokens_limit:
        raise BadRequest(
            f"max_tokens is {int(max_tokens)}; this server generates at most "
            f"{max_tokens_limit} tokens per completion (KIAPI_CHAT_MAX_TOKENS)",
            param="max_tokens",
        )
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"'stop' holds 1 to {MAX_STOP} non-empty strings", param="stop")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    options = body.get("stream_options") or {}
    return ChatRequest(
        spec=spec,
        messages=messages,
        max_tokens=None if max_tokens is None else int(max_tokens),
        max_tokens_limit=max_tokens_limit,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=None if body.get("seed") is None else int(body["seed"]),
        stop=stops,
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
    )


def _message(index: int, message: dict[str, Any]) -> dict[str, str]:
    role = message["role"]
    if role not in ROLES:
        raise BadRequest(
            f"messages[{index}]: role {excerpt(role)} is not one of system, user, assistant",
            param="messages",
        )
    content = message.get("content")
    if isinstance(content, list):
        kinds = {part.get("type") for part in content}
        if kinds - {"text"}:
            raise BadRequest(
                f"messages[{index}]: only text parts are supported, not "
                f"{', '.join(sorted(str(k) for k in kinds - {'text'}))}",
                param="messages",
            )
        content = "".join(part.get("text", "") for part in content)
    if content is None:
        content = ""
    return {"role": "system" if role == "developer" else role, "content": content}


@dataclass
class Prepared:
    """A request's prompt tokens and its token budget, checked against the context."""

    prompt: list[int]
    max_tokens: int


def prepare(chat, request: ChatRequest) -> Prepared:
    """Render the chat template, tokenize, check the context (any thread; needs the loaded
    :class:`~kiapi.runtime.llm_engine.ChatModel`). 400 saying by how much it is too long."""
    try:
        prompt = chat.encode(chat.render(request.messages))
    except Exception as exc:  # a template that refuses these messages (raise_exception)
        raise BadRequest(f"the model's chat template refused the messages: {exc}") from None
    context = chat.context_length
    room = context - len(prompt)
    if room < 1:
        raise BadRequest(
            f"the prompt is {len(prompt)} tokens, {len(prompt) - context + 1} more than "
            f"{request.spec.name!r} can take (context {context} tokens, 1 left to answer)",
            param="messages",
        )
    wanted = request.max_tokens
    if wanted is not None and wanted > room:
        raise BadRequest(
            f"the prompt ({len(prompt)} tokens) and max_tokens ({wanted}) need "
            f"{len(prompt) + wanted} tokens, {len(prompt) + wanted - context} more than the "
            f"context of {context}",
            param="max_tokens",
        )
    return Prepared(prompt, wanted if wanted is not None else min(request.max_tokens_limit, room))


# -- the text a member streams ------------------------------------------------------------
class TextStream:
    """Generated token ids -> text deltas, with stop strings cut exactly.

    The text is decoded from all ids so far (a multi-byte character split across tokens
    decodes whole); what could still turn out to be the start of a stop string, or an
    incomplete character, is held back until the next token decides."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self._decode = decode
        self._stops = stops
        self.ids: list[int] = []
        self.text = ""  # the text sent so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text to send after ``token``; sets ``stopped`` at a stop string."""
        self.ids.append(token)
        full = self._decode(self.ids)
        found = [
            at
            for stop in self._stops
            if (at := full.find(stop, max(0, len(self.text) - len(stop)))) >= 0
        ]
        if found:  # the earliest stop string wins
            self.stopped = True
            return self._send(full[: min(found)])
        ready = len(full)
        if full.endswith("\ufffd"):
            ready -= 1  # half a character: wait for its other bytes
        for stop in self._stops:
            for keep in range(min(len(stop) - 1, ready), 0, -1):
                if full[ready - keep : ready] == stop[:keep]:
                    ready -= keep
                    break
        return self._send(full[: max(ready, len(self.text))])

    def flush(self) -> str:
        """At the end: whatever was held back (no stop string came)."""
        return self._send(self._decode(self.ids)) if not self.stopped else ""

    def _send(self, upto: str) -> str:
        delta = upto[len(self.text) :]
        self.text = upto if len(upto) > len(self.text) else self.text
        return delta


# -- the worker's runner --------------------------------------------------------------------
@dataclass
class ChatItem:
    """What a chat job carries to the worker."""

    request: ChatRequest
    channel: Channel
    received: float
    prepared: Prepared | None = None  # tokenized by the handler when the model was resident


@dataclass
class _Member:
    job: Job
    item: ChatItem
    prepared: Prepared
    stream: TextStream
    kv_gb: float
    uid: int = -1
    first_token_at: float | None = None
    finished: JobOutput | BaseException | None = None
    generated: int = 0


class ChatRunner:
    """One chat model's continuous batch as a worker step runner (worker thread only)."""

    def __init__(
        self, spec: ModelSpec, memory: MemoryManager, store: JobStore, make_generator
    ) -> None:
        self.spec = spec
        self._memory = memory
        self._store = store
        self.chat = memory.acquire(spec)  # in use (never evicted) until close
        try:
            self._generator = make_generator(self.chat)
        except BaseException:
            memory.release(spec)
            raise
        self._members: dict[int, _Member] = {}
        self._by_job: dict[str, _Member] = {}

    @property
    def busy(self) -> bool:
        return bool(self._members)

    def join(self, job: Job, item: ChatItem) -> None:
        from kiapi.runtime.llm_engine import Sampling

        prepared = item.prepared or prepare(self.chat, item.request)
        tokens = len(prepared.prompt) + prepared.max_tokens
        kv_gb = tokens * self.chat.kv_bytes_per_token / 1e9
        self._memory.reserve(self.spec, kv_gb, f"{tokens} tokens of KV cache for {job.id}")
        member = _Member(
            job, item, prepared, TextStream(self.chat.decode, item.request.stop), kv_gb
        )
        request = item.request
        try:
            member.uid = self._generator.add(
                prepared.prompt,
                prepared.max_tokens,
                Sampling(request.temperature, request.top_p, request.seed),
            )
        except BaseException:
            self._memory.unreserve(self.spec, kv_gb)
            raise
        self._members[member.uid] = member
        self._by_job[job.id] = member
        self._store.report(job, 0.0, f"prefill of {len(prepared.prompt)} prompt tokens")

    def stop(self, job: Job) -> bool:
        member = self._by_job.get(job.id)
        if member is None or member.finished is not None:
            return False
        self._generator.remove(member.uid)
        member.finished = JobCanceled(job.id, while_running=True)
        return True

    def step(self) -> list[tuple[Job, JobOutput | BaseException]]:
        if any(m.finished is None for m in self._members.values()):
            for step in self._generator.step():
                member = self._members.get(step.uid)
                if member is not None and member.finished is None:
                    self._advance(member, step.token, step.finish)
        done = [m for m in self._members.values() if m.finished is not None]
        for member in done:
            self._leave(member)
        return [(m.job, m.finished) for m in done]  # type: ignore[misc]

    def _advance(self, member: _Member, token: int, finish: str | None) -> None:
        now = time.perf_counter()
        if member.first_token_at is None:
            member.first_token_at = now
        is_stop_token = finish == "stop" and token in self.chat.stop_ids
        if not is_stop_token:
            member.generated += 1
            delta = member.stream.push(token)
            if delta:
                member.item.channel.put(("delta", delta))
        if member.stream.stopped and finish is None:
            self._generator.remove(member.uid)
            finish = "stop"
        budget = member.prepared.max_tokens
        self._store.report(
            member.job,
            member.generated / budget,
            f"generated {member.generated}/{budget} tokens",
        )
        if finish is not None:
            tail = member.stream.flush()
            if tail:
                member.item.channel.put(("delta", tail))
            member.finished = self._output(member, finish, now)

    def _output(self, member: _Member, finish: str, now: float) -> JobOutput:
        prompt_tokens = len(member.prepared.prompt)
        first = member.first_token_at or now
        decode_s = max(now - first, 1e-9)
        result = {
            "model": self.spec.name,
            "message": {"role": "assistant", "content": member.stream.text},
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": member.generated,
                "total_tokens": prompt_tokens + member.generated,
            },
            "timings": {
                "ttft_s": round(first - member.item.received, 6),
                "tokens_per_s": round(max(member.generated - 1, 0) / decode_s, 3),
                "total_s": round(now - member.item.received, 6),
            },
        }
        return JobOutput(result=result)

    def _leave(self, member: _Member) -> None:
        self._members.pop(member.uid, None)
        self._by_job.pop(member.job.id, None)
        self._memory.unreserve(self.spec, member.kv_gb)

    def close(self, reason: BaseException) -> list[tuple[Job, JobOutput | BaseException]]:
        left = []
        for member in list(self._members.values()):
            if member.finished is None:
                self._generator.remove(member.uid)
                member.finished = reason
            left.append((member.job, member.finished))
            self._leave(member)
        try:
            self._generator.close()
        finally:
            self._memory.release(self.spec)
        return left


def chat_job(
    memory: MemoryManager, store: JobStore, item: ChatItem, make_generator=None
) -> Joinable:
    """The job body of one completion: it joins the runner of its model."""
    spec = item.request.spec

    def open_runner() -> ChatRunner:
        from kiapi.runtime.llm_engine import Generator

        return ChatRunner(spec, memory, store, make_generator or Generator)

    return Joinable(key=(CHAT, spec.name), item=item, open_runner=open_runner)
