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
from collections.abc import Awaitable, Callable
from typing import Any

from kiapi.config import Settings
from kiapi.runtime import blas
from kiapi.runtime.catalog import EMBEDDING, default_registry
from kiapi.runtime.errors import ClientGone, SyncTimeout
from kiapi.runtime.files import FileStore
from kiapi.runtime.images import ImageLoader, ImagePolicy
from kiapi.runtime.jobs import RUNNING, Job, JobStore
from kiapi.runtime.memory import MemoryManager, load_with_spec_loader
from kiapi.runtime.mlx_engine import release_idle_memory
from kiapi.runtime.registry import LoadedModel, ModelSpec, Registry
from kiapi.runtime.worker import BatchPolicy, JobBody, JobOutput, Worker

log = logging.getLogger(__name__)


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
        self.registry = registry or default_registry(settings.model_paths)
        self._default_note = self.registry.choose_default(
            EMBEDDING, settings.embedding_default_model
        )
        self.jobs = JobStore(max_finished=settings.max_finished_jobs)
        self.memory = MemoryManager(
            settings.memory_limit_gb,
            default_ttl_s=settings.default_ttl_s,
            loader=loader,
            clock=clock,
        )
        self.worker = Worker(
            self.jobs,
            max_queue=settings.max_queue,
            idle_interval_s=settings.ttl_sweep_s,
            on_idle=self.memory.sweep,
            on_quiet=release_idle_memory,
            batch=BatchPolicy(
                settings.batch_max_items,
                settings.batch_max_tokens,
                settings.batch_fill_wait_ms / 1000,
            ),
        )
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

    def _warmup_from_settings(self) -> list[ModelSpec]:
        """``KIAPI_WARMUP`` names, or the effective default embedding model if it is set up."""
        names = self.settings.warmup_names()
        if names is None:
            default = self.registry.default(EMBEDDING)
            return [default] if default is not None and default.is_set_up() else []
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
        if self._default_note:
            log.warning(self._default_note)
        default = self.registry.default(EMBEDDING)
        if default is not None:
            log.info("default embedding model: %s", default.name)
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
            for spec in self._warmup:
                try:
                    with self.memory.use(spec):
                        loaded.append(spec.name)
                except Exception as exc:  # warmup is best effort: report, keep serving
                    log.warning("warmup of %s skipped: %s", spec.name, exc)
                    skipped[spec.name] = str(exc)
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
        return self._warm.is_set()

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
        params: dict[str, Any],
        body: JobBody,
        *,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> JobOutput:
        """Submit a job and wait for it up to ``sync_timeout_s``.

        On timeout raises :class:`SyncTimeout` naming the job, which keeps running.
        ``client_gone()`` completes when the caller has disconnected: a job still queued then is
        canceled (no one will read it; it frees the queue) and a running one finishes into its
        record; :class:`ClientGone` is raised either way. ``asyncio.wait`` never cancels what it
        waits for, so a caller's own cancellation leaves the job running too.
        """
        job = self.submit(job_type, params, body)
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            waiting = {result} if gone is None else {result, gone}
            done, _ = await asyncio.wait(
                waiting, timeout=self.settings.sync_timeout_s, return_when=FIRST_COMPLETED
            )
        finally:
            if gone is not None:
                gone.cancel()
        if result in done:
            return result.result()
        if gone is not None and gone in done:
            result.add_done_callback(_retrieve)  # nobody awaits it any more
            canceled = self.worker.cancel(job)
            log.info(
                "client left while waiting for %s (%s)",
                job.id,
                "canceled" if canceled else "finishing",
            )
            raise ClientGone(job.id)
        raise SyncTimeout(job.id, self.settings.sync_timeout_s)

    def delete_job(self, job_id: str) -> dict[str, Any]:
        """Forget a job record; a queued job is canceled, a running one keeps running."""
        job = self.jobs.forget(job_id)
        canceled = self.worker.cancel(job)
        return {
            "deleted": True,
            "job_id": job_id,
            "was_running": not canceled and job.status == RUNNING,
        }

    # -- health ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        worker_alive = self.worker.thread is not None and self.worker.thread.is_alive()
        return {
            "status": "ok" if worker_alive else "degraded",
            "warm": self.warm,
            "queue_len": self.worker.queue_len(),
            "memory": self.memory.snapshot(),
        }
