"""The runtime every capability shares: job store, worker, file store, registry, memory.

One :class:`Runtime` exists per server process. The app's lifespan creates it, calls
:meth:`Runtime.start` before the first request and :meth:`Runtime.stop` after the last; the
handlers reach it through the lifespan state. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from kiapi.config import Settings
from kiapi.runtime import blas, qmatmul
from kiapi.runtime.catalog import CAPABILITIES, default_registry
from kiapi.runtime.errors import ClientGone, ModelNotSetUp, Overloaded, SyncTimeout
from kiapi.runtime.files import FileStore
from kiapi.runtime.images import ImageLoader, ImagePolicy
from kiapi.runtime.jobs import (
    FAILED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
    report_progress,
    reporting_for,
)
from kiapi.runtime.memory import MemoryManager, load_with_spec_loader
from kiapi.runtime.metrics import Metrics
from kiapi.runtime.mlx_engine import release_idle_memory
from kiapi.runtime.openai_compat import model_object
from kiapi.runtime.registry import LoadedModel, ModelSpec, Registry
from kiapi.runtime.worker import BatchPolicy, JobBody, JobOutput, Worker

log = logging.getLogger(__name__)


class Done(NamedTuple):
    """A finished job of :meth:`Runtime.run_sync`: its id and its output."""

    job_id: str
    output: JobOutput


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned future's outcome as seen (else asyncio logs it as never retrieved)."""
    if not future.cancelled():
        future.exception()


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry | None = None,
        loader: Callable[[ModelSpec], LoadedModel] = load_with_spec_loader,
        clock: Callable[[], float] = time.monotonic,
        warmup: list[ModelSpec] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or default_registry(settings.model_paths, settings.models_file)
        self._default_notes = [
            note
            for cap in CAPABILITIES
            if (
                note := self.registry.choose_default(
                    cap.family, getattr(settings, cap.default_setting)
                )
            )
        ]
        self.jobs = JobStore(max_finished=settings.max_finished_jobs)
        self.memory = MemoryManager(
            settings.memory_limit_gb,
            default_ttl_s=settings.default_ttl_s,
            loader=self._visible(loader),
            clock=clock,
        )
        self.metrics = Metrics()
        self.worker = Worker(
            self.jobs,
            metrics=self.metrics,
            max_queue=settings.max_queue,
            idle_interval_s=settings.ttl_sweep_s,
            on_idle=self.memory.sweep,
            on_quiet=release_idle_memory,
            batch=BatchPolicy(
                settings.batch_max_items,
                settings.batch_max_tokens,
                settings.batch_fill_wait_ms / 1000,
            ),
            interlude_share=settings.interlude_share,
            sched_batch=settings.worker_sched_batch,
        )
        self.metrics.watch(self.worker.queue_len, self.memory)
        self.files = FileStore(settings.files_root, max_upload_bytes=settings.max_upload_bytes)
        self.images = ImageLoader(
            ImagePolicy(
                local_roots=tuple(settings.local_input_roots),
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                fetch_timeout_s=settings.image_fetch_timeout_s,
                allow_private_urls=settings.allow_private_urls,
            ),
            self.files,
        )
        self._warmup = list(warmup) if warmup is not None else self._warmup_from_settings()
        self._warm = threading.Event()
        self._warmup_failures: dict[str, str] = {}  # written by the worker during warmup

    def _visible(
        self, loader: Callable[[ModelSpec], LoadedModel]
    ) -> Callable[[ModelSpec], LoadedModel]:
        """``loader`` as a ``model_load`` job in the job store (worker thread), so a load shows
        in ``/v1/jobs`` with its progress and phase labels while it runs, and its outcome
        after. The job that needed the model says which load it waits for."""

        def load(spec: ModelSpec) -> LoadedModel:
            job = self.jobs.create("model_load", {"model": spec.name})
            report_progress(None, f"waiting for {spec.name} to load ({job.id})")
            self.jobs.mark_running(job)
            with reporting_for(self.jobs, job):
                report_progress(0.0, f"loading {spec.name}")
                try:
                    loaded = loader(spec)
                except BaseException as exc:
                    self.jobs.finish(job, FAILED, error=str(exc))
                    raise
            self.jobs.finish(
                job, SUCCEEDED, result={"model": spec.name, "weight_gb": loaded.weight_gb}
            )
            return loaded

        return load

    def _warmup_from_settings(self) -> list[ModelSpec]:
        """``KIAPI_WARMUP`` names, or each capability's effective default that is set up."""
        names = self.settings.warmup_names()
        if names is None:
            defaults = (self.registry.default(cap.family) for cap in CAPABILITIES)
            return [d for d in defaults if d is not None and d.is_set_up()]
        specs = []
        for name in names:
            spec = self.registry.find(name)
            if spec is None:
                raise ValueError(f"KIAPI_WARMUP names unknown model {name!r}")
            specs.append(spec)
        return specs

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        blas.activate(self.settings.blas)
        qmatmul.configure(self.settings.matmul_precision)
        for note in self._default_notes:
            log.warning(note)
        for problem in self.registry.problems:
            log.warning("model catalog: %s", problem)
        for cap in CAPABILITIES:
            if (default := self.registry.default(cap.family)) is not None:
                log.info("default %s model: %s", cap.family, default.name)
        self.files.open()
        self.worker.start()
        if not self._warmup:
            self._warm.set()
            return
        job = self.jobs.create("warmup", {"models": [s.name for s in self._warmup]})
        self.worker.submit(job, self._warm_up)

    def _warm_up(self) -> JobOutput:
        """Worker thread: load the warmup models; the server is ``warm`` when this is done."""
        loaded, skipped = [], {}
        try:
            for done, spec in enumerate(self._warmup):
                report_progress(done / len(self._warmup), f"warming up {spec.name}")
                try:
                    with self.memory.use(spec):
                        loaded.append(spec.name)
                except Exception as exc:  # warmup is best effort: report, keep serving
                    log.warning("warmup of %s skipped: %s", spec.name, exc)
                    skipped[spec.name] = str(exc)
                    self._warmup_failures[spec.name] = str(exc)[:300]
        finally:
            self._warm.set()
        return JobOutput(result={"loaded": loaded, "skipped": skipped})

    def stop(self) -> None:
        """Stop the worker (queued jobs are canceled), then unload every model.

        Once the worker thread has ended, the stopping thread owns the memory manager.
        """
        self.worker.stop()
        self.memory.unload_all()

    @property
    def warm(self) -> bool:
        """Warmup has finished and every capability's default model can serve."""
        return self._warm.is_set() and not self.not_ready()

    def not_ready(self) -> dict[str, str]:
        """Capability -> why its default model cannot serve (not set up, or its warmup
        failed). Resident defaults cost nothing; the others one file-system lookup each, so
        a ``kiapi setup`` run beside a live server shows at the next /health."""
        reasons = {}
        for cap in CAPABILITIES:
            spec = self.registry.default(cap.family)
            if spec is None or self.memory.is_resident(spec.name):
                continue
            failed = self._warmup_failures.get(spec.name)
            try:
                spec.require_set_up()
            except ModelNotSetUp as exc:
                reasons[cap.family] = f"{spec.name}: {exc.detail}; {exc.hint}"
                continue
            if failed is not None:
                reasons[cap.family] = f"{spec.name}: warmup failed: {failed}"
        return reasons

    # -- jobs -----------------------------------------------------------------------------
    def require_runnable(self, spec: ModelSpec) -> None:
        """Answer 503 now rather than queue a job that cannot run. A resident model can run;
        any other must be set up (its weights found), which costs file-system lookups."""
        if not self.memory.is_resident(spec.name):
            spec.require_set_up()

    def submit(self, job_type: str, params: dict[str, Any], body: JobBody) -> Job:
        job = self.jobs.create(job_type, params)
        self.worker.submit(job, body)
        return job

    async def run_sync(
        self,
        job_type: str,
        jobs: Sequence[tuple[dict[str, Any], JobBody]],
        *,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Done]:
        """Run one job per ``(params, body)`` and wait for all of them, up to ``sync_timeout_s``
        in all; returns each job's id and output, in the given order.

        At most ``max_queue // 2`` (at least one) of them wait in the queue at a time, so one
        large request leaves room for other clients; the rest are submitted as earlier ones
        finish. A full queue refuses (:class:`Overloaded`, 503) only when none of them is
        queued yet; otherwise the call waits for its own jobs to make room.

        * A job that fails: its error is raised and the call's queued jobs are canceled.
        * Timeout: :class:`SyncTimeout` naming the first unfinished job; submitted jobs keep
          running, the rest are never created.
        * ``client_gone()`` completes when the caller has disconnected: queued jobs are canceled
          (no one will read them), running ones finish into their records, and
          :class:`ClientGone` is raised.

        ``asyncio.wait`` never cancels what it waits for, so a caller's own cancellation leaves
        the jobs running too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.sync_timeout_s
        window = max(1, self.settings.max_queue // 2)
        outputs: list[Done | None] = [None] * len(jobs)
        waiting: dict[asyncio.Future, tuple[int, Job]] = {}
        submitted = 0
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            while submitted < len(jobs) or waiting:
                while submitted < len(jobs) and len(waiting) < window:
                    params, body = jobs[submitted]
                    try:
                        job = self.submit(job_type, params, body)
                    except Overloaded:
                        if not waiting:
                            raise
                        break  # room comes as our own jobs finish
                    waiting[asyncio.wrap_future(job.future)] = (submitted, job)
                    submitted += 1
                remaining = deadline - loop.time()
                done: set = set()
                if remaining > 0:
                    watched = set(waiting) if gone is None else {*waiting, gone}
                    done, _ = await asyncio.wait(
                        watched, timeout=remaining, return_when=FIRST_COMPLETED
                    )
                if gone is not None and gone in done:
                    canceled = self._abandon(waiting, cancel=True)
                    first = min(waiting.values(), key=lambda entry: entry[0])[1]
                    log.info("client left while waiting for %s (%d canceled)", first.id, canceled)
                    raise ClientGone(first.id)
                if not done:
                    first = min(waiting.values(), key=lambda entry: entry[0])[1]
                    self._abandon(waiting, cancel=False)
                    raise SyncTimeout(first.id, self.settings.sync_timeout_s)
                for future in done:
                    index, job = waiting.pop(future)
                    if future.exception() is not None:
                        self._abandon(waiting, cancel=True)
                        raise future.exception()
                    outputs[index] = Done(job.id, future.result())
        finally:
            if gone is not None:
                gone.cancel()
        return outputs  # type: ignore[return-value]

    def _abandon(self, waiting: dict[asyncio.Future, tuple[int, Job]], *, cancel: bool) -> int:
        """Stop waiting for these jobs (their outcomes are marked seen); with ``cancel``, the
        queued ones are canceled. Returns how many were canceled."""
        canceled = 0
        for future, (_index, job) in waiting.items():
            future.add_done_callback(_retrieve)
            if cancel:
                if self.worker.cancel(job):
                    canceled += 1
                else:
                    self.worker.stop_running(job)  # a generation ends; a batch runs out
        return canceled

    def stop_job(self, job: Job) -> None:
        """End ``job`` as soon as possible: canceled if queued, stopped at its next step if it
        runs in a step runner (a chat completion); a running batch job finishes."""
        if not self.worker.cancel(job):
            self.worker.stop_running(job)

    def delete_job(self, job_id: str) -> dict[str, Any]:
        """Forget a job record; a queued job is canceled, a running generation stops at its
        next step, any other running job keeps running."""
        job = self.jobs.forget(job_id)
        canceled = self.worker.cancel(job)
        if not canceled and job.status == RUNNING:
            self.worker.stop_running(job)
        return {
            "deleted": True,
            "job_id": job_id,
            "was_running": not canceled and job.status == RUNNING,
        }

    # -- models ---------------------------------------------------------------------------
    def servable_models(self, family: str) -> list[dict[str, Any]]:
        """The family's models that can serve now (resident, or set up), in OpenAI's shape;
        ``created`` is the weight folder's modification time."""
        servable = []
        for spec in self.registry.models(family):
            folder = spec.weights_folder()  # one lookup; None also for loader-only specs
            if folder is None and not (self.memory.is_resident(spec.name) or spec.is_set_up()):
                continue
            servable.append(model_object(spec, int(folder.stat().st_mtime) if folder else 0))
        return servable

    # -- health ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        worker_alive = self.worker.thread is not None and self.worker.thread.is_alive()
        not_ready = self.not_ready()
        health = {
            "status": "ok" if worker_alive else "degraded",
            "warm": self._warm.is_set() and not not_ready,
            "queue_len": self.worker.queue_len(),
            "memory": self.memory.snapshot(),
        }
        if not_ready:
            health["not_ready"] = not_ready
        return health
