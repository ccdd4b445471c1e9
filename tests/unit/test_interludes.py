"""The worker's interludes: queued batches of resident models run inside a step, at the
engine's checkpoints, within their share of the worker's time."""

from __future__ import annotations

import pytest

from kiapi.runtime import interlude
from kiapi.runtime.jobs import SUCCEEDED, JobStore
from kiapi.runtime.metrics import Metrics
from kiapi.runtime.worker import Batchable, JobOutput, Joinable, Worker
from tests.support import wait_until

LAYERS = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LayeredRunner:
    """One member; each step is ``LAYERS`` layers of one clock second each, with a checkpoint
    after every layer, as a decode step of a packed model has."""

    def __init__(self, log: list, clock: FakeClock) -> None:
        self.log, self.clock = log, clock
        self.member = None

    @property
    def busy(self) -> bool:
        return self.member is not None

    def join(self, job, item) -> None:
        self.member = [job, item]

    def step(self):
        for layer in range(LAYERS):
            self.clock.now += 1.0
            self.log.append(("layer", layer))
            interlude.checkpoint()
        self.member[1] -= 1
        if self.member[1] > 0:
            return []
        job, self.member = self.member[0], None
        return [(job, JobOutput(result={}))]

    def stop(self, job) -> bool:
        return False

    def close(self, reason):
        return [] if self.member is None else [(self.member[0], reason)]


class Scene:
    """A worker (not started) with one step runner's job queued first, then batch jobs."""

    def __init__(self, share: float, metrics: Metrics | None = None) -> None:
        self.store = JobStore(max_finished=100)
        self.clock = FakeClock()
        self.log: list = []
        self.worker = Worker(
            self.store, max_queue=20, interlude_share=share, clock=self.clock, metrics=metrics
        )
        self.jobs = []
        self.submit(
            Joinable(key="chat", item=1, open_runner=lambda: LayeredRunner(self.log, self.clock))
        )

    def submit(self, body, job_type: str = "test") -> None:
        job = self.store.create(job_type, {})
        self.worker.submit(job, body)
        self.jobs.append(job)

    def batch(self, key: str, *, ready, seconds: float = 1.0, nested_checkpoint=False):
        def run_batch(items):
            self.clock.now += seconds
            self.log.append(("batch", key))
            if nested_checkpoint:
                interlude.checkpoint()  # work inside an interlude reaches no interlude
            return [JobOutput(result={}) for _ in items]

        return Batchable(key=key, item=key, run_batch=run_batch, ready_now=ready)

    def run(self) -> list:
        self.worker.start()
        try:
            wait_until(lambda: all(job.status == SUCCEEDED for job in self.jobs))
        finally:
            self.worker.stop()
        return self.log


def test_a_ready_batch_runs_between_layers_within_its_share():
    """Share 1/4: after a 1-second interlude the next waits 3 seconds; batches that are not
    ready (their model would load) or never said so wait for the step's end, as before."""
    scene = Scene(share=0.25)
    scene.submit(scene.batch("a", ready=lambda: True, nested_checkpoint=True))
    scene.submit(scene.batch("b", ready=lambda: True))
    scene.submit(scene.batch("not-resident", ready=lambda: False))
    scene.submit(scene.batch("no-answer", ready=None))
    assert scene.run() == [
        ("layer", 0), ("batch", "a"),  # t=2: the next interlude from t=5
        ("layer", 1), ("layer", 2), ("layer", 3), ("batch", "b"),  # t=5
        ("batch", "not-resident"), ("batch", "no-answer"),  # after the step, one per turn
    ]  # fmt: skip


def test_each_interlude_is_timed_by_its_batch_type():
    """``kiapi_interlude_duration_seconds``: one observation per interlude, its worker time by
    the worker's clock, labelled with the batch's job type; batches run after the step are
    not interludes."""
    metrics = Metrics()
    scene = Scene(share=0.25, metrics=metrics)
    scene.submit(scene.batch("a", ready=lambda: True, seconds=1.0), job_type="embedding")
    scene.submit(scene.batch("b", ready=lambda: True, seconds=0.5), job_type="rerank")
    scene.submit(scene.batch("not-resident", ready=lambda: False), job_type="embedding")
    scene.run()
    sample = metrics.registry.get_sample_value
    name = "kiapi_interlude_duration_seconds"
    assert sample(f"{name}_count", {"type": "embedding"}) == 1
    assert sample(f"{name}_sum", {"type": "embedding"}) == 1.0
    assert sample(f"{name}_count", {"type": "rerank"}) == 1
    assert sample(f"{name}_sum", {"type": "rerank"}) == 0.5


def test_an_interlude_whose_jobs_were_all_canceled_is_not_timed():
    """A batch whose waiter gave up before the worker took it runs nothing, so it is not
    observed; the next ready batch runs at the next checkpoint."""
    metrics = Metrics()
    scene = Scene(share=0.25, metrics=metrics)
    scene.submit(scene.batch("gone", ready=lambda: True), job_type="embedding")
    assert scene.jobs[-1].future.cancel()
    scene.submit(scene.batch("b", ready=lambda: True, seconds=0.5), job_type="rerank")
    chat, gone, b = scene.jobs
    scene.worker.start()
    try:
        wait_until(lambda: chat.status == SUCCEEDED and b.status == SUCCEEDED)
    finally:
        scene.worker.stop()
    sample = metrics.registry.get_sample_value
    name = "kiapi_interlude_duration_seconds"
    assert sample(f"{name}_count", {"type": "embedding"}) is None
    assert sample(f"{name}_count", {"type": "rerank"}) == 1
    assert scene.log[:3] == [("layer", 0), ("layer", 1), ("batch", "b")]


def test_share_zero_keeps_every_batch_for_the_steps_end():
    scene = Scene(share=0.0)
    scene.submit(scene.batch("a", ready=lambda: True))
    assert scene.run() == [("layer", n) for n in range(LAYERS)] + [("batch", "a")]


def test_a_checkpoint_outside_a_step_does_nothing():
    ran = []
    interlude.checkpoint()
    with interlude.handling(lambda: ran.append(1)):
        interlude.checkpoint()
        interlude.checkpoint()
    interlude.checkpoint()
    assert ran == [1, 1]


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_share_must_leave_the_step_some_time(share):
    with pytest.raises(ValueError, match="interlude_share"):
        Worker(JobStore(max_finished=1), max_queue=1, interlude_share=share)


def test_a_queue_of_jobs_that_are_not_ready_is_asked_once_per_checkpoint():
    """Jobs waiting for a model that would load share one answer: each checkpoint asks once
    for their batch key, not once per queued job (256 jobs at every layer of every step)."""
    scene = Scene(share=0.25)
    asked = []

    def not_resident() -> bool:
        asked.append(1)
        return False

    for _ in range(10):
        scene.submit(scene.batch("cold", ready=not_resident, seconds=0.0))
    scene.run()
    assert len(asked) == LAYERS  # one step of LAYERS checkpoints; the jobs ran after it
