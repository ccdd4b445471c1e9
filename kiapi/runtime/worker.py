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
* Once the queue has been empty for ``quiet_after_s`` after some work, the ``on_quiet`` hook
  runs on the worker thread, once per busy period (the engine hands back cached buffers and
  free heap pages, so a server at rest holds only its live memory).
* Batching: when the job taken is :class:`Batchable`, the worker also takes every queued job
  with the same ``key`` (in queue order, wherever they wait) up to ``batch.max_items`` jobs and
  ``batch.max_cost`` summed cost, and runs them in one ``run_batch`` call. A batch is what is
  queued when the worker gets to it; only after a batch of several jobs does it wait, briefly
  (``BatchPolicy.fill_wait_s``), for as many again. Each job keeps its own record, result and
  error: ``run_batch`` returns one outcome per member.
* Steps: a :class:`Joinable` job joins a :class:`StepRunner` (one per ``key``: one model's
  generation batch), opened on its first job. While any runner is busy the worker alternates:
  one queued unit (a job, a batch, or every queued job that joins the same runner), then one
  :meth:`StepRunner.step` of each busy runner. So an embedding batch waits at most one decode
  step, and a request joins a running generation between two steps. A runner that is no
  longer busy is closed. :meth:`Worker.stop_running` asks a runner to end a job at its next
  step.
* Interludes: inside a step, at each :func:`~kiapi.runtime.interlude.checkpoint` the engine
  reaches (between two layers), the worker may run one queued batch whose
  :attr:`Batchable.ready_now` says it can start at once (its model resident: nothing loads,
  nothing is evicted for it). Interludes take at most ``interlude_share`` of the worker's
  time: after one that took t seconds, the next waits ``t * (1 - share) / share``. So a
  request for a resident model waits a fraction of a decode step, not all of it, and the
  step's streams keep the rest of the time. ``interlude_share=0`` turns them off.
* Scheduling policy: with ``sched_batch`` the worker thread runs under Linux's
  ``SCHED_BATCH`` (:func:`enter_sched_batch`), and so do the threads it starts, which inherit
  it: MLX's stream threads (created at a stream's first evaluation) and the kernel's OpenMP
  threads. A thread under that policy preempts no one when it wakes. An MLX evaluation queues
  each operation to its stream's thread and wakes it; under the default policy the woken
  thread switched the worker out at every operation (~48 000 switches a second in a 4-stream
  SmolLM2 decode, ``perf`` by hand), now the worker queues them all and the stream thread runs
  them on the other core or once the worker waits. The event loop's threads keep the default
  policy, so a request's wake-up still preempts inference.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiapi.runtime import interlude
from kiapi.runtime.errors import JobCanceled, KiapiError, Overloaded
from kiapi.runtime.jobs import CANCELED, FAILED, SUCCEEDED, Job, JobStore, reporting_for
from kiapi.runtime.metrics import Metrics

log = logging.getLogger(__name__)


def enter_sched_batch() -> bool:
    """Put the calling thread under Linux's ``SCHED_BATCH`` (threads it starts afterwards
    inherit it); False, and nothing changed, where the system has no such policy or refuses
    it (a seccomp profile, say)."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return False
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as exc:
        log.info("the worker keeps the default scheduling policy: %s", exc)
        return False
    return True


@dataclass
class JobOutput:
    """What a job body returns: the job's ``result`` record and any produced file ids."""

    result: dict[str, Any]
    artifacts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Batchable:
    """A job body the worker may run in one call with other queued jobs of the same ``key``.

    ``run_batch(items)`` gets the ``item`` of every member, in queue order, and returns one
    outcome per member, in the same order: its :class:`JobOutput`, or the exception that fails
    that member alone. ``cost`` is the member's share of ``BatchPolicy.max_cost`` (for
    embeddings: its estimated tokens). Members with equal keys must have interchangeable
    ``run_batch`` callables.

    ``ready_now`` (worker thread, cheap): True when the batch could run this instant without
    loading or evicting anything, so the worker may run it inside another job's step (an
    interlude); None: never inside a step.
    """

    key: Hashable
    item: Any
    run_batch: Callable[[Sequence[Any]], Sequence[JobOutput | BaseException]]
    cost: int = 1
    ready_now: Callable[[], bool] | None = None


@dataclass(frozen=True)
class BatchPolicy:
    """How much one batch may hold: ``max_items`` jobs and ``max_cost`` summed cost (a single
    job over ``max_cost`` still runs, alone). ``max_items=1`` turns batching off.

    ``fill_wait_s``: when the previous batch had n > 1 jobs, the worker waits up to this long
    for n jobs to be queued before it starts the next batch. Under load the clients of a
    finished batch answer back within milliseconds, and a full batch is cheaper per item than
    two half batches racing the event loop for the CPU; a single client never waits.
    """

    max_items: int = 32
    max_cost: int = 16384
    fill_wait_s: float = 0.02

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_cost < 1 or self.fill_wait_s < 0:
            raise ValueError("batch limits must be >= 1 and the fill wait >= 0")


class StepRunner(Protocol):
    """Work that advances in steps on the worker thread and that jobs join while it runs.

    Worker thread only. ``join`` takes a started job (raising fails that job alone);
    ``step`` advances every member once and returns the members that finished, each with its
    outcome; ``stop`` ends a member now (its outcome comes from the next ``step``);
    ``busy`` says whether any member remains; ``close`` ends every member left (each with
    the outcome it returns) and frees what the runner holds."""

    def join(self, job: Job, item: Any) -> None: ...

    def step(self) -> list[tuple[Job, JobOutput | BaseException]]: ...

    def stop(self, job: Job) -> bool: ...

    @property
    def busy(self) -> bool: ...

    def close(self, reason: BaseException) -> list[tuple[Job, JobOutput | BaseException]]: ...


@dataclass(frozen=True)
class Joinable:
    """A job body that joins the :class:`StepRunner` of ``key``; ``open_runner`` makes that
    runner when none is running (worker thread)."""

    key: Hashable
    item: Any
    open_runner: Callable[[], StepRunner]


JobBody = Callable[[], JobOutput] | Batchable | Joinable


class Worker:
    def __init__(
        self,
        store: JobStore,
        *,
        max_queue: int,
        idle_interval_s: float = 30.0,
        on_idle: Callable[[], None] | None = None,
        quiet_after_s: float = 1.0,
        on_quiet: Callable[[], None] | None = None,
        batch: BatchPolicy | None = None,
        metrics: Metrics | None = None,
        interlude_share: float = 0.0,
        sched_batch: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if not 0 <= interlude_share < 1:
            raise ValueError("interlude_share must be in [0, 1)")
        self._interlude_share = interlude_share
        self._sched_batch = sched_batch
        self._clock = clock
        self._interlude_after = -math.inf  # no interlude before this clock reading (worker)
        self._store = store
        self._max_queue = max_queue
        self._idle_interval_s = idle_interval_s
        self._on_idle = on_idle
        self._quiet_after_s = quiet_after_s
        self._on_quiet = on_quiet
        self._worked = False  # jobs ran since on_quiet last ran (worker thread only)
        self._batch = batch or BatchPolicy()
        self._metrics = metrics
        self._queue: deque[tuple[Job, JobBody]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_job_s = 1.0  # running estimate for Retry-After
        self._last_batch = 1
        self._runners: dict[Hashable, StepRunner] = {}  # worker thread only
        self._stop_requests: list[Job] = []  # running jobs to end, under _cond

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

    def stop_running(self, job: Job) -> None:
        """Ask the runner a running :class:`Joinable` job belongs to to end it at its next
        step (any thread; a job that is not in a runner is left as it is)."""
        with self._cond:
            self._stop_requests.append(job)
            self._cond.notify()

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
    def _next(self, *, block: bool = True) -> list[tuple[Job, JobBody]] | None:
        """The next queued job with the queued jobs that share its batch or its runner; None
        when stopping. Blocks until a job is queued (running the quiet and idle hooks while it
        waits) unless ``block`` is false: then an empty list when nothing is queued."""
        while True:
            quieting = self._worked and self._on_quiet is not None
            with self._cond:
                if self._stopping:
                    return None
                if self._queue:
                    first = self._queue.popleft()
                    if block:  # never while a step runner waits for its next step
                        self._wait_for_batch_mates(first[1])
                    batch = [first, *self._take_batch_mates(first[1])]
                    self._last_batch = len(batch)
                    self._worked = True
                    return batch
                if not block:
                    return []
                wait = self._quiet_after_s if quieting else self._idle_interval_s
                notified = self._cond.wait(wait)
            if notified:
                continue
            if quieting:
                self._worked = False
                self._hook(self._on_quiet, "quiet")
            else:
                self._hook(self._on_idle, "idle")

    def _wait_for_batch_mates(self, body: JobBody) -> None:
        """Under concurrent load (the previous batch had several jobs), give the clients of
        that batch up to ``fill_wait_s`` to send their next requests (lock held; the wait
        releases it). A lone client's batches have one job, so it never waits; nor does a
        worker with a busy step runner (:meth:`_next` skips it): its decode steps would
        stall for the wait, and the late jobs join the next turn's batch anyway."""
        wait = self._batch.fill_wait_s
        if not isinstance(body, Batchable) or wait <= 0 or self._last_batch < 2:
            return
        want = min(self._last_batch, self._batch.max_items) - 1
        deadline = time.monotonic() + wait
        while len(self._queue) < want and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _take_batch_mates(self, body: JobBody) -> list[tuple[Job, JobBody]]:
        """Remove and return the queued jobs that may join ``body``'s batch, or, for a
        :class:`Joinable`, every queued job of its runner (lock held)."""
        if isinstance(body, Joinable):
            mates = [q for q in self._queue if isinstance(q[1], Joinable) and q[1].key == body.key]
            self._queue = deque(q for q in self._queue if q not in mates)
            return mates
        if not isinstance(body, Batchable) or self._batch.max_items == 1:
            return []
        mates: list[tuple[Job, JobBody]] = []
        cost = body.cost
        kept: deque[tuple[Job, JobBody]] = deque()
        for queued in self._queue:
            other = queued[1]
            if (
                len(mates) + 1 < self._batch.max_items
                and isinstance(other, Batchable)
                and other.key == body.key
                and cost + other.cost <= self._batch.max_cost
            ):
                mates.append(queued)
                cost += other.cost
            else:
                kept.append(queued)
        self._queue = kept
        return mates

    @staticmethod
    def _hook(hook: Callable[[], None] | None, name: str) -> None:
        if hook is None:
            return
        try:
            hook()
        except Exception:  # a hook must never kill the worker
            log.exception("worker %s hook failed", name)

    def _start(self, job: Job) -> bool:
        """Queued -> running; False (and nothing to run) if it was canceled meanwhile."""
        if not self._store.mark_running(job):
            return False  # canceled while queued
        if not job.future.set_running_or_notify_cancel():
            self._store.finish(job, FAILED, error="its waiter canceled the job's future")
            return False
        return True

    def _done(self, job: Job, outcome: JobOutput | BaseException) -> None:
        """The job's record, then its metrics, then its waiter: a client that has its answer
        sees the job finished and counted (a fast job's metrics once came after its reply)."""
        if isinstance(outcome, JobCanceled):
            self._store.finish(job, CANCELED, error=outcome.detail)
        elif isinstance(outcome, KiapiError):
            self._store.finish(job, FAILED, error=outcome.detail)
        elif isinstance(outcome, BaseException):
            log.error("job %s (%s) crashed", job.id, job.type, exc_info=outcome)
            self._store.finish(job, FAILED, error=f"internal error: {outcome!r}")
        else:
            self._store.finish(job, SUCCEEDED, result=outcome.result, artifacts=outcome.artifacts)
        if self._metrics is not None:
            self._metrics.job_done(job.type, job.status, job.run_seconds())
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _run(self) -> None:
        if self._sched_batch:
            enter_sched_batch()
        try:
            while (taken := self._next(block=not self._runners)) is not None:
                self._run_taken(taken)
                self._step_runners()
        finally:
            for runner in self._runners.values():
                self._close_runner(
                    runner, Overloaded("the server is shutting down", retry_after_s=5)
                )
            self._runners.clear()

    def _run_taken(self, taken: list[tuple[Job, JobBody]]) -> bool:
        """Start the taken jobs and run (or join) those not canceled meanwhile; False when
        every one of them was."""
        members = [(job, body) for job, body in taken if self._start(job)]
        if not members:
            return False
        if isinstance(members[0][1], Joinable):
            self._join(members)
            return True
        self._run_members(members)
        return True

    def _join(self, members: list[tuple[Job, JobBody]]) -> None:
        """Put started :class:`Joinable` jobs (one key) into their runner, opening it."""
        body: Joinable = members[0][1]  # type: ignore[assignment]
        runner = self._runners.get(body.key)
        if runner is None:
            try:
                runner = body.open_runner()
            except Exception as exc:  # e.g. the model cannot load: these jobs fail
                for job, _ in members:
                    self._done(job, exc)
                return
            self._runners[body.key] = runner
        for job, member in members:
            try:
                with reporting_for(self._store, job):
                    runner.join(job, member.item)  # type: ignore[union-attr]
            except Exception as exc:
                self._done(job, exc)

    def _step_runners(self) -> None:
        """Stop what was asked to stop, then one step of every runner; close idle ones."""
        with self._cond:
            stops, self._stop_requests = self._stop_requests, []
        if not self._runners:
            return
        for job in stops:
            for runner in self._runners.values():
                if runner.stop(job):
                    break
        for key, runner in list(self._runners.items()):
            try:
                if self._interlude_share > 0:
                    with interlude.handling(self._interlude):
                        finished = runner.step()
                else:
                    finished = runner.step()
            except Exception as exc:  # a runner that breaks fails its members, not the worker
                log.error("step runner %r crashed", key, exc_info=exc)
                self._runners.pop(key)
                self._close_runner(runner, exc)
                continue
            for job, outcome in finished:
                self._done(job, outcome)
            if not runner.busy:
                self._runners.pop(key)
                self._close_runner(runner, Overloaded("the runner closed", retry_after_s=1))

    def _interlude(self) -> None:
        """At a checkpoint inside a step: run the first queued batch that is ready now (with
        its queued batch mates, without waiting for more), unless the last interlude's share
        of the worker's time has not been served yet."""
        began = self._clock()
        if began < self._interlude_after or not self._queue:
            return
        with self._cond:
            if self._stopping:
                return
            taken = self._take_ready()
        if not taken:
            return
        self._worked = True
        if not self._run_taken(taken):
            return  # all canceled meanwhile: nothing ran, no time to account for
        ended = self._clock()
        if self._metrics is not None:
            self._metrics.interlude_ran(taken[0][0].type, ended - began)
        share = self._interlude_share
        self._interlude_after = ended + (ended - began) * (1 - share) / share

    def _take_ready(self) -> list[tuple[Job, JobBody]]:
        """Remove and return the first queued :class:`Batchable` that is ready now, with its
        batch mates; empty when none is (lock held). Each batch key is asked once: a queue of
        many jobs for a model that is not ready is scanned at every checkpoint."""
        answers: dict[Hashable, bool] = {}
        for index, (job, body) in enumerate(self._queue):
            if not isinstance(body, Batchable) or body.ready_now is None:
                continue
            if body.key not in answers:
                answers[body.key] = body.ready_now()
            if answers[body.key]:
                del self._queue[index]
                return [(job, body), *self._take_batch_mates(body)]
        return []

    def _close_runner(self, runner: StepRunner, reason: BaseException) -> None:
        try:
            left = runner.close(reason)
        except Exception:
            log.exception("closing a step runner failed")
            return
        for job, outcome in left:
            self._done(job, outcome)

    def _run_members(self, members: list[tuple[Job, JobBody]]) -> None:
        """Run one job or one batch to its end."""
        started = time.monotonic()
        outcomes = self._outcomes(members)
        if self._metrics is not None:  # before any reply, as a job's own metrics
            self._metrics.batch_ran(members[0][0].type, len(members))
        for job, outcome in zip((job for job, _ in members), outcomes, strict=True):
            self._done(job, outcome)
        elapsed = (time.monotonic() - started) / len(members)
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed

    def _outcomes(self, members: list[tuple[Job, JobBody]]) -> list[JobOutput | BaseException]:
        """Run one job, or one batch of jobs, and return an outcome per member."""
        job, body = members[0]
        try:
            with reporting_for(self._store, job):
                if isinstance(body, Batchable):
                    outcomes = list(body.run_batch([b.item for _, b in members]))  # type: ignore[union-attr]
                    if len(outcomes) != len(members):
                        raise RuntimeError(
                            f"run_batch returned {len(outcomes)} outcomes for {len(members)} jobs"
                        )
                    return outcomes
                return [body()]
        except Exception as exc:  # a KiapiError is the clients' error; anything else, a bug
            return [exc] * len(members)
