"""The single-flight worker: one thread runs every job, in FIFO order.

Invariants:

* Only the worker thread calls a job's body — and so only it touches MLX and calls the memory
  manager's ``acquire``/``sweep``. Other threads submit jobs and wait on ``job.future``.
* The queue is bounded (``max_queue`` waiting jobs); a full queue refuses with
  :class:`~kiapi.runtime.errors.Overloaded` (503 + ``Retry-After``) instead of growing.
* A job body returns a :class:`JobOutput` or raises. A :class:`KiapiError` is the client's
  error, passed to the waiter as is; any other exception is a bug: the job fails with the
  message and the waiter gets the exception.
* When no job arrives for ``idle_interval_s`` the ``on_idle`` hook runs on the worker thread
  (the memory manager's TTL sweep).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kiapi.runtime.errors import JobCanceled, KiapiError, Overloaded
from kiapi.runtime.jobs import FAILED, SUCCEEDED, Job, JobStore, reporting_for

log = logging.getLogger(__name__)


@dataclass
class JobOutput:
    """What a job body returns: the job's ``result`` record and any produced file ids."""

    result: dict[str, Any]
    artifacts: list[str] = field(default_factory=list)


JobBody = Callable[[], JobOutput]


class Worker:
    def __init__(
        self,
        store: JobStore,
        *,
        max_queue: int,
        idle_interval_s: float = 30.0,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._store = store
        self._max_queue = max_queue
        self._idle_interval_s = idle_interval_s
        self._on_idle = on_idle
        self._queue: deque[tuple[Job, JobBody]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_job_s = 1.0  # running estimate for Retry-After

    # -- any thread -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="kiapi-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the running job; queued jobs are canceled."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job, _ in pending:
            if self._store.cancel_if_queued(job):
                job.future.set_exception(JobCanceled(job.id))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def queue_len(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job, body: JobBody) -> Future:
        """Queue ``job``; its ``future`` resolves with the :class:`JobOutput` or the error."""
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down", retry_after_s=5)
            if len(self._queue) >= self._max_queue:
                retry = max(1, min(60, math.ceil(len(self._queue) * self._mean_job_s)))
                self._store.forget(job.id)
                raise Overloaded(
                    f"the job queue is full ({self._max_queue} jobs waiting)",
                    hint="retry after the Retry-After delay, or raise KIAPI_MAX_QUEUE",
                    retry_after_s=retry,
                )
            self._queue.append((job, body))
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job: True if it was queued (it will never run)."""
        if not self._store.cancel_if_queued(job):
            return False
        with self._cond:
            for index, (queued, _) in enumerate(self._queue):
                if queued is job:
                    del self._queue[index]
                    break
        job.future.set_exception(JobCanceled(job.id))
        return True

    # -- worker thread --------------------------------------------------------------------
    def _next(self) -> tuple[Job, JobBody] | None:
        """Block until a job is queued (running the idle hook on quiet intervals)."""
        while True:
            with self._cond:
                if self._stopping:
                    return None
                if self._queue:
                    return self._queue.popleft()
                notified = self._cond.wait(self._idle_interval_s)
            if not notified:
                self._idle()

    def _idle(self) -> None:
        if self._on_idle is None:
            return
        try:
            self._on_idle()
        except Exception:  # the idle hook must never kill the worker
            log.exception("worker idle hook failed")

    def _run(self) -> None:
        while (item := self._next()) is not None:
            job, body = item
            if not self._store.mark_running(job):
                continue  # canceled while queued
            if not job.future.set_running_or_notify_cancel():
                self._store.finish(job, FAILED, error="its waiter canceled the job's future")
                continue
            started = time.monotonic()
            try:
                with reporting_for(self._store, job):
                    output = body()
            except KiapiError as exc:
                self._store.finish(job, FAILED, error=exc.detail)
                job.future.set_exception(exc)
            except Exception as exc:
                log.exception("job %s (%s) crashed", job.id, job.type)
                self._store.finish(job, FAILED, error=f"internal error: {exc!r}")
                job.future.set_exception(exc)
            else:
                self._store.finish(job, SUCCEEDED, result=output.result, artifacts=output.artifacts)
                job.future.set_result(output)
            elapsed = time.monotonic() - started
            self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
