"""In-memory job records, their retention bound, and the context-local progress reporter.

Ownership: the worker thread moves jobs through their lifecycle (``queued -> running ->
succeeded|failed``); HTTP handlers create jobs, read snapshots, and delete records. Every
mutation and every snapshot happens under the store's lock, so readers never see a half-updated
job. Jobs are in memory only: they are gone after a restart (files are not).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from kiapi.runtime.errors import NotFound

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "canceled",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})

MEDIA_FIELDS = frozenset({"image", "images", "audio", "video", "mask", "file"})
MAX_KEPT_MEDIA_CHARS = 512
MAX_KEPT_TEXT_CHARS = 4096


def new_job_id() -> str:
    return "job_" + secrets.token_hex(8)


def redact_params(params: dict[str, Any]) -> dict[str, Any]:
    """Copy of request params fit for a job record: inline media replaced by a short summary.

    Media fields keep short references (file ids, URLs, paths up to 512 chars); inline data
    (base64, data URLs) becomes ``"<redacted: data:image/png, 1234 chars>"``. Any other string
    longer than 4096 chars is cut with a note of its full length.
    """

    def redact(key: str | None, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: redact(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [redact(key, v) for v in value]
        if not isinstance(value, str):
            return value
        if key in MEDIA_FIELDS and (len(value) > MAX_KEPT_MEDIA_CHARS or value.startswith("data:")):
            kind = (
                value.split(";", 1)[0].split(",", 1)[0] if value.startswith("data:") else "inline"
            )
            return f"<redacted: {kind}, {len(value)} chars>"
        if len(value) > MAX_KEPT_TEXT_CHARS:
            return value[:MAX_KEPT_TEXT_CHARS] + f"…<truncated, {len(value)} chars in all>"
        return value

    return {k: redact(k, v) for k, v in params.items()}


@dataclass
class Job:
    """One unit of work. ``future`` resolves with the result (or error) for sync waiters."""

    type: str
    params: dict[str, Any]
    id: str = field(default_factory=new_job_id)
    status: str = QUEUED
    result: dict[str, Any] | None = None
    artifacts: list[str] = field(default_factory=list)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: float | None = None
    progress_label: str = QUEUED
    future: Future = field(default_factory=Future, repr=False, compare=False)

    def run_seconds(self) -> float:
        """Seconds from start to finish (0 for a job that never started)."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return max(0.0, self.finished_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "params": self.params,
            "status": self.status,
            "result": self.result,
            "artifacts": list(self.artifacts),
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "progress_label": self.progress_label,
        }


class JobStore:
    """Thread-safe registry of jobs; keeps at most ``max_finished`` terminal jobs (oldest go)."""

    def __init__(self, max_finished: int = 1000, clock: Callable[[], float] = time.time) -> None:
        if max_finished < 0:
            raise ValueError("max_finished must be >= 0")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._max_finished = max_finished
        self._clock = clock
        self._lock = threading.Lock()

    # -- handler side ---------------------------------------------------------------------
    def create(self, job_type: str, params: dict[str, Any]) -> Job:
        job = Job(type=job_type, params=redact_params(params), created_at=self._clock())
        with self._lock:
            self._jobs[job.id] = job
        return job

    def snapshot(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id!r} (jobs are kept in memory only)")
            return job.to_dict()

    def list(self) -> list[dict[str, Any]]:
        """Snapshots of every retained job, newest first."""
        with self._lock:
            return [job.to_dict() for job in reversed(self._jobs.values())]

    def forget(self, job_id: str) -> Job:
        """Remove the record and return the job as it was. Raises NotFound."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)
        if job is None:
            raise NotFound(f"no job with id {job_id!r} (jobs are kept in memory only)")
        return job

    # -- worker side ----------------------------------------------------------------------
    def mark_running(self, job: Job) -> bool:
        """Queued -> running. False if the job was canceled meanwhile (then do not run it)."""
        with self._lock:
            if job.status != QUEUED:
                return False
            job.status = RUNNING
            job.started_at = self._clock()
            job.progress_label = RUNNING
            return True

    def cancel_if_queued(self, job: Job) -> bool:
        """Queued -> canceled, atomically with respect to :meth:`mark_running`.

        True when the job was still queued (the worker will never run it); False when it is
        already running or finished.
        """
        with self._lock:
            if job.status != QUEUED:
                return False
            self._finish_locked(job, CANCELED, None, None, "canceled before it ran")
            return True

    def report(self, job: Job, progress: float | None, label: str | None) -> None:
        with self._lock:
            if job.status != RUNNING:
                return
            if progress is not None:
                job.progress = min(1.0, max(0.0, float(progress)))
            if label is not None:
                job.progress_label = label

    def finish(
        self,
        job: Job,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        artifacts: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        """Move ``job`` to a terminal state and apply the retention bound."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal status: {status}")
        with self._lock:
            self._finish_locked(job, status, result, artifacts, error)

    def _finish_locked(self, job: Job, status: str, result, artifacts, error) -> None:
        job.status = status
        job.finished_at = self._clock()
        job.result = result
        job.artifacts = list(artifacts or [])
        job.error = error
        job.progress_label = "done" if status == SUCCEEDED else status
        if status == SUCCEEDED:
            job.progress = 1.0
        if job.id in self._jobs:
            self._finished[job.id] = None
        while len(self._finished) > self._max_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._jobs.pop(oldest, None)


# --------------------------------------------------------------------------- progress

_reporter: ContextVar[Callable[[float | None, str | None], None] | None] = ContextVar(
    "kiapi_progress_reporter", default=None
)


def report_progress(progress: float | None = None, label: str | None = None) -> None:
    """Report the current job's progress (0..1) and/or phase label; a no-op outside a job."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(progress, label)


@contextmanager
def reporting_for(store: JobStore, job: Job) -> Iterator[None]:
    """Within this block, :func:`report_progress` updates ``job``."""
    token = _reporter.set(lambda progress, label: store.report(job, progress, label))
    try:
        yield
    finally:
        _reporter.reset(token)
