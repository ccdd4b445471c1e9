"""Prometheus metrics (``prometheus-client``): one :class:`Metrics` per runtime.

Events are recorded where they happen: the HTTP layer calls :meth:`Metrics.request_done`,
the worker :meth:`Metrics.job_done`, :meth:`Metrics.batch_ran` and
:meth:`Metrics.interlude_ran`. State that already lives in the runtime (queue length, resident
models, evictions) is read at scrape time by :class:`RuntimeCollector`, so it can never drift
from what ``/health`` says. Each :class:`Metrics` has its own registry: several apps in one
process (the tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kiapi.runtime.memory import MemoryManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
INTERLUDE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiapi_http_requests",
            "HTTP requests answered, by operation (operationId), method and status.",
            ["operation", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "kiapi_http_request_duration_seconds",
            "Time from request to the last byte of the answer, by operation and status.",
            ["operation", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "kiapi_job_duration_seconds",
            "Run time of finished jobs (queue wait not included), by type and outcome.",
            ["type", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiapi_batch_size",
            "Jobs run together in one worker call (embedding requests batched in one pass).",
            ["type"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.interlude_seconds = Histogram(
            "kiapi_interlude_duration_seconds",
            "Worker time of each interlude (a queued batch run between two layers of another "
            "job's step, which waits meanwhile), by the batch's job type.",
            ["type"],
            buckets=INTERLUDE_BUCKETS,
            registry=self.registry,
        )

    def request_done(self, operation: str, method: str, status: int, seconds: float) -> None:
        labels = (operation, method, str(status))
        self.requests.labels(*labels).inc()
        self.request_seconds.labels(*labels).observe(seconds)

    def job_done(self, job_type: str, outcome: str, seconds: float) -> None:
        self.job_seconds.labels(job_type, outcome).observe(seconds)

    def batch_ran(self, job_type: str, size: int) -> None:
        self.batch_size.labels(job_type).observe(size)

    def interlude_ran(self, job_type: str, seconds: float) -> None:
        self.interlude_seconds.labels(job_type).observe(seconds)

    def watch(self, queue_len: Callable[[], int], memory: MemoryManager) -> None:
        """Expose the runtime's own state at scrape time (called once, by the runtime)."""
        self.registry.register(RuntimeCollector(queue_len, memory))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Queue length, resident models and GB, the budget, and evictions by reason."""

    def __init__(self, queue_len: Callable[[], int], memory: MemoryManager) -> None:
        self.queue_len = queue_len
        self.memory = memory

    def collect(self) -> Iterator:
        yield GaugeMetricFamily(
            "kiapi_queue_length", "Jobs waiting for the worker.", value=self.queue_len()
        )
        snapshot = self.memory.snapshot()
        resident = GaugeMetricFamily(
            "kiapi_model_resident", "1 for each model resident in memory.", labels=["model"]
        )
        for entry in snapshot["loaded"]:
            resident.add_metric([entry["name"]], 1)
        yield resident
        yield GaugeMetricFamily(
            "kiapi_models_resident", "Models resident in memory.", value=len(snapshot["loaded"])
        )
        yield GaugeMetricFamily(
            "kiapi_resident_gb",
            "Memory held by resident models, GB.",
            value=snapshot["resident_gb"],
        )
        yield GaugeMetricFamily(
            "kiapi_memory_budget_gb", "The models' memory budget, GB.", value=snapshot["budget_gb"]
        )
        evictions = CounterMetricFamily(
            "kiapi_model_evictions", "Models unloaded, by reason.", labels=["reason"]
        )
        for reason, count in sorted(dict(self.memory.evictions).items()):  # a copy: atomic
            evictions.add_metric([reason], count)
        yield evictions
