import threading
import time

import pytest

from kiapi.runtime.errors import BadRequest, JobCanceled, NotFound, Overloaded
from kiapi.runtime.jobs import JobStore, redact_params, report_progress
from kiapi.runtime.worker import Batchable, BatchPolicy, JobOutput, Worker
from tests.support import wait_until


@pytest.fixture
def store():
    return JobStore(max_finished=100)


@pytest.fixture
def worker(store):
    w = Worker(store, max_queue=2, idle_interval_s=0.05)
    w.start()
    yield w
    w.stop()


class Gate:
    """A job body that blocks until released, so tests control what is running."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self):
        self.started.set()
        assert self.release.wait(5)
        return JobOutput(result={"ok": True})


def test_jobs_run_in_fifo_order_on_one_thread(store, worker):
    seen = []

    def body(i):
        def run():
            seen.append((i, threading.current_thread().name))
            return JobOutput(result={"i": i})

        return run

    gate = Gate()
    worker.submit(store.create("t", {}), gate)
    gate.started.wait(5)
    jobs = [store.create("t", {"i": i}) for i in range(2)]
    futures = [worker.submit(j, body(i)) for i, j in enumerate(jobs)]
    gate.release.set()
    assert [f.result(5).result["i"] for f in futures] == [0, 1]
    assert seen == [(0, "kiapi-worker"), (1, "kiapi-worker")]
    snap = store.snapshot(jobs[0].id)
    assert (
        snap["status"] == "succeeded"
        and snap["progress"] == 1.0
        and snap["progress_label"] == "done"
    )
    assert snap["started_at"] >= snap["created_at"] and snap["finished_at"] >= snap["started_at"]


def test_queue_full_raises_overloaded_with_retry_after(store, worker):
    gate = Gate()
    worker.submit(store.create("t", {}), gate)
    gate.started.wait(5)
    for _ in range(2):
        worker.submit(store.create("t", {}), lambda: JobOutput(result={}))
    extra = store.create("t", {})
    with pytest.raises(Overloaded) as err:
        worker.submit(extra, lambda: JobOutput(result={}))
    assert err.value.status == 503 and int(err.value.headers()["Retry-After"]) >= 1
    assert "KIAPI_MAX_QUEUE" in err.value.hint
    with pytest.raises(NotFound):  # a refused job leaves no record behind
        store.snapshot(extra.id)
    assert worker.queue_len() == 2
    gate.release.set()


def test_cancel_queued_job_never_runs(store, worker):
    gate = Gate()
    worker.submit(store.create("t", {}), gate)
    gate.started.wait(5)
    ran = []
    job = store.create("t", {})
    future = worker.submit(job, lambda: ran.append(1) or JobOutput(result={}))
    assert worker.cancel(job) is True
    assert worker.queue_len() == 0
    with pytest.raises(JobCanceled):
        future.result(1)
    gate.release.set()
    time.sleep(0.1)
    assert ran == [] and job.status == "canceled"


def test_cancel_running_job_is_refused(store, worker):
    gate = Gate()
    job = store.create("t", {})
    future = worker.submit(job, gate)
    gate.started.wait(5)
    assert worker.cancel(job) is False
    gate.release.set()
    assert future.result(5).result == {"ok": True}


def test_client_error_and_crash_fail_only_their_job(store, worker):
    def bad():
        raise BadRequest("nope")

    def crash():
        raise ZeroDivisionError("boom")

    j1, j2, j3 = (store.create("t", {}) for _ in range(3))
    f1 = worker.submit(j1, bad)
    f2 = worker.submit(j2, crash)
    with pytest.raises(BadRequest):
        f1.result(5)
    with pytest.raises(ZeroDivisionError):
        f2.result(5)
    assert worker.submit(j3, lambda: JobOutput(result={"fine": 1})).result(5).result == {"fine": 1}
    assert store.snapshot(j1.id)["error"] == "nope"
    assert "boom" in store.snapshot(j2.id)["error"]
    assert store.snapshot(j2.id)["status"] == "failed"


def test_progress_is_reported_from_inside_the_job(store, worker):
    gate = threading.Event()
    seen = threading.Event()

    def body():
        report_progress(0.25, "denoising")
        seen.set()
        gate.wait(5)
        report_progress(7)  # clamped to 1
        return JobOutput(result={})

    job = store.create("t", {})
    future = worker.submit(job, body)
    seen.wait(5)
    snap = store.snapshot(job.id)
    assert (snap["progress"], snap["progress_label"], snap["status"]) == (
        0.25,
        "denoising",
        "running",
    )
    gate.set()
    future.result(5)


def test_report_progress_outside_a_job_is_a_noop():
    report_progress(0.5, "anything")  # must not raise


def test_retention_bound_drops_oldest_finished(store):
    small = JobStore(max_finished=2)
    jobs = [small.create("t", {}) for _ in range(4)]
    queued = small.create("t", {})
    for j in jobs:
        small.finish(j, "succeeded", result={})
    ids = [j["id"] for j in small.list()]
    assert ids == [queued.id, jobs[3].id, jobs[2].id]  # newest first, queued never dropped


def test_idle_hook_runs_on_the_worker_thread(store):
    calls = []
    w = Worker(
        store,
        max_queue=1,
        idle_interval_s=0.01,
        on_idle=lambda: calls.append(threading.current_thread().name),
    )
    w.start()
    wait_until(lambda: len(calls) >= 2)
    w.stop()
    assert set(calls) == {"kiapi-worker"}


def test_quiet_hook_runs_once_per_busy_period_on_the_worker_thread(store):
    quiet = []
    w = Worker(
        store,
        max_queue=4,
        quiet_after_s=0.02,
        idle_interval_s=30,
        on_quiet=lambda: quiet.append(threading.current_thread().name),
    )
    w.start()
    try:
        time.sleep(0.1)
        assert quiet == []  # no work yet: nothing to hand back
        for _ in range(3):
            w.submit(store.create("t", {}), lambda: JobOutput(result={})).result(5)
        wait_until(lambda: len(quiet) == 1)
        time.sleep(0.1)
        assert quiet == ["kiapi-worker"]  # once, not every quiet interval
        w.submit(store.create("t", {}), lambda: JobOutput(result={})).result(5)
        wait_until(lambda: len(quiet) == 2)
    finally:
        w.stop()


def test_a_failing_hook_does_not_stop_the_worker(store):
    def broken():
        raise RuntimeError("hook bug")

    w = Worker(store, max_queue=4, quiet_after_s=0.01, on_quiet=broken)
    w.start()
    try:
        for _ in range(2):
            w.submit(store.create("t", {}), lambda: JobOutput(result={})).result(5)
            time.sleep(0.05)  # the hook has failed in between
        assert w.thread.is_alive()
    finally:
        w.stop()


def test_stop_cancels_queued_jobs(store):
    w = Worker(store, max_queue=4)
    w.start()
    gate = Gate()
    w.submit(store.create("t", {}), gate)
    gate.started.wait(5)
    queued = store.create("t", {})
    future = w.submit(queued, lambda: JobOutput(result={}))
    threading.Timer(0.05, gate.release.set).start()
    w.stop()
    with pytest.raises(JobCanceled):
        future.result(1)
    with pytest.raises(Overloaded):
        w.submit(store.create("t", {}), lambda: JobOutput(result={}))


def test_redaction_of_large_media():
    image = "data:image/png;base64," + "A" * 5000
    params = redact_params(
        {"image": image, "text": "hi", "model": "m", "nested": {"audio": "B" * 900}}
    )
    assert params["image"] == f"<redacted: data:image/png, {len(image)} chars>"
    assert params["nested"]["audio"] == "<redacted: inline, 900 chars>"
    assert params["text"] == "hi"
    assert redact_params({"image": "file_0123456789abcdef"})["image"] == "file_0123456789abcdef"
    long_text = redact_params({"text": "x" * 10_000})["text"]
    assert len(long_text) < 4200 and "10000 chars" in long_text


# --------------------------------------------------------------------------- batching


class Recorder:
    """A batch body that records each call's items and answers per item (an int item ``n``
    succeeds with ``{"n": n}``; the item ``"bad"`` fails with a client error)."""

    def __init__(self):
        self.calls = []

    def __call__(self, items):
        self.calls.append(list(items))
        return [
            BadRequest("bad item") if item == "bad" else JobOutput(result={"n": item})
            for item in items
        ]

    def body(self, item, key="k", cost=1):
        return Batchable(key=key, item=item, run_batch=self, cost=cost)


def held_worker(store, policy, max_queue=64):
    """A started worker whose first job blocks until released, so tests fill its queue."""
    w = Worker(store, max_queue=max_queue, batch=policy)
    w.start()
    gate = Gate()
    w.submit(store.create("t", {}), gate)
    assert gate.started.wait(5)
    return w, gate


def test_queued_jobs_with_one_key_run_as_one_batch_in_queue_order(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy(max_items=32))
    jobs = [store.create("e", {"i": i}) for i in range(5)]
    futures = [w.submit(job, rec.body(i)) for i, job in enumerate(jobs)]
    gate.release.set()
    assert [f.result(5).result for f in futures] == [{"n": i} for i in range(5)]
    w.stop()
    assert rec.calls == [[0, 1, 2, 3, 4]]
    assert all(store.snapshot(j.id)["status"] == "succeeded" for j in jobs)


def test_batches_respect_keys_item_cap_and_cost_budget(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy(max_items=3, max_cost=10))
    bodies = [
        rec.body(0, cost=4),
        rec.body(1, key="other"),  # another model: its own batch
        rec.body(2, cost=4),
        rec.body(3, cost=4),  # would make 12 > 10: next batch
        rec.body(4, cost=1),
        rec.body(5, cost=1),
        rec.body(6, cost=1),  # a fourth item: over the cap of 3
        rec.body(7, cost=50),  # over the budget on its own: runs alone
    ]
    futures = [w.submit(store.create("e", {}), b) for b in bodies]
    gate.release.set()
    assert [f.result(5).result["n"] for f in futures] == list(range(8))
    w.stop()
    assert rec.calls == [[0, 2, 4], [1], [3, 5, 6], [7]]


def test_max_items_one_turns_batching_off(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy(max_items=1))
    futures = [w.submit(store.create("e", {}), rec.body(i)) for i in range(3)]
    gate.release.set()
    [f.result(5) for f in futures]
    w.stop()
    assert rec.calls == [[0], [1], [2]]


def test_a_lone_job_runs_without_waiting_for_a_batch(store):
    rec = Recorder()
    w = Worker(store, max_queue=4, batch=BatchPolicy(max_items=32, fill_wait_s=5.0))
    w.start()
    started = time.monotonic()
    assert w.submit(store.create("e", {}), rec.body(1)).result(5).result == {"n": 1}
    assert time.monotonic() - started < 1.0  # a wait would take 5 s
    w.stop()
    assert rec.calls == [[1]]


def test_a_bad_member_fails_only_its_own_job(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy())
    jobs = [store.create("e", {}) for _ in range(3)]
    futures = [w.submit(j, rec.body(item)) for j, item in zip(jobs, [1, "bad", 3], strict=True)]
    gate.release.set()
    assert futures[0].result(5).result == {"n": 1} and futures[2].result(5).result == {"n": 3}
    with pytest.raises(BadRequest):
        futures[1].result(5)
    w.stop()
    assert rec.calls == [[1, "bad", 3]]
    assert [store.snapshot(j.id)["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert store.snapshot(jobs[1].id)["error"] == "bad item"


def test_a_failing_batch_call_fails_every_member_and_the_worker_goes_on(store):
    def broken(items):
        raise ZeroDivisionError("boom")

    w, gate = held_worker(store, BatchPolicy())
    jobs = [store.create("e", {}) for _ in range(2)]
    futures = [w.submit(j, Batchable("k", i, broken)) for i, j in enumerate(jobs)]
    gate.release.set()
    for f in futures:
        with pytest.raises(ZeroDivisionError):
            f.result(5)
    assert w.submit(store.create("t", {}), lambda: JobOutput(result={"ok": 1})).result(5)
    w.stop()
    assert all("boom" in store.snapshot(j.id)["error"] for j in jobs)


def test_a_canceled_job_is_left_out_of_its_batch(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy())
    jobs = [store.create("e", {}) for _ in range(3)]
    futures = [w.submit(j, rec.body(i)) for i, j in enumerate(jobs)]
    assert w.cancel(jobs[1])
    gate.release.set()
    assert futures[2].result(5).result == {"n": 2}
    w.stop()
    assert rec.calls == [[0, 2]]


def test_sequential_jobs_never_wait_for_batch_mates(store):
    rec = Recorder()
    w = Worker(store, max_queue=4, batch=BatchPolicy(fill_wait_s=5.0))
    w.start()
    started = time.monotonic()
    for i in range(3):  # one client: each batch has one job, so no wait ever starts
        assert w.submit(store.create("e", {}), rec.body(i)).result(5).result == {"n": i}
    assert time.monotonic() - started < 1.0
    w.stop()
    assert rec.calls == [[0], [1], [2]]


def test_after_a_batch_of_n_the_worker_waits_briefly_for_n_again(store):
    rec = Recorder()
    w, gate = held_worker(store, BatchPolicy(fill_wait_s=0.3))
    futures = [w.submit(store.create("e", {}), rec.body(i)) for i in range(3)]
    gate.release.set()
    [f.result(5) for f in futures]  # a batch of 3
    started = time.monotonic()
    first = w.submit(store.create("e", {}), rec.body(3))
    time.sleep(0.05)  # arrives during the wait: joins the batch
    second = w.submit(store.create("e", {}), rec.body(4))
    assert first.result(5) and second.result(5)
    waited = time.monotonic() - started
    w.stop()
    assert rec.calls == [[0, 1, 2], [3, 4]]
    assert 0.25 <= waited < 2.0  # waited for a third job that never came, then ran


class SeenMetrics:
    """A ``Metrics`` stand-in that records, for each job and batch it is told of, how many of
    the jobs' waiters already had their answers then."""

    def __init__(self, jobs):
        self.jobs, self.answered_before = jobs, []

    def job_done(self, job_type, outcome, seconds):
        self.answered_before.append(("job", sum(j.future.done() for j in self.jobs)))

    def batch_ran(self, job_type, size):
        self.answered_before.append(("batch", sum(j.future.done() for j in self.jobs)))


def test_a_job_is_counted_before_its_waiter_has_the_answer(store):
    """A client that has its reply and then reads /metrics sees its job counted (a 2 ms
    embedding's job and batch metrics once came after the reply: a flaky contract test)."""
    rec = Recorder()
    jobs = [store.create("e", {"i": i}) for i in range(2)]
    metrics = SeenMetrics(jobs)
    w = Worker(store, max_queue=8, batch=BatchPolicy(max_items=32), metrics=metrics)
    w.start()
    gate = Gate()
    w.submit(store.create("t", {}), gate)
    assert gate.started.wait(5)
    futures = [w.submit(job, rec.body(i)) for i, job in enumerate(jobs)]
    gate.release.set()
    assert [f.result(5).result for f in futures] == [{"n": 0}, {"n": 1}]
    w.stop()
    assert rec.calls == [[0, 1]]
    # the batch before any answer; each job before its own (the second after the first's)
    assert metrics.answered_before[-3:] == [("batch", 0), ("job", 0), ("job", 1)]
