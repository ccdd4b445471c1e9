"""Runtime.run_sync over several jobs: order, the half-queue window, and what happens to the
jobs on a full queue, a failure, a timeout and a departed client."""

import asyncio
import threading

import pytest

from kiapi.config import Settings
from kiapi.runtime.core import Runtime
from kiapi.runtime.errors import BadRequest, ClientGone, Overloaded, SyncTimeout
from kiapi.runtime.jobs import CANCELED, SUCCEEDED
from kiapi.runtime.worker import JobOutput
from tests.support import hold_the_worker


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(
        Settings(_env_file=None, files_root=tmp_path, warmup="none", max_queue=4),
        warmup=[],
    )
    rt.start()
    yield rt
    rt.stop()


def body(value, seen=None):
    def run():
        if seen is not None:
            seen.append(value)
        return JobOutput(result={"value": value})

    return run


def test_outputs_come_in_order_and_never_hold_more_than_half_the_queue(runtime):
    seen, peak = [], []

    def watching(value):
        def run():
            peak.append(runtime.worker.queue_len())
            seen.append(value)
            return JobOutput(result={"value": value})

        return run

    jobs = [({"i": i}, watching(i)) for i in range(9)]
    done = asyncio.run(runtime.run_sync("t", jobs))
    assert [d.output.result["value"] for d in done] == list(range(9))
    assert seen == list(range(9))
    assert max(peak) < 2  # window of 4 // 2 = 2: at most one other waits while one runs
    assert [runtime.jobs.snapshot(d.job_id)["status"] for d in done] == [SUCCEEDED] * 9


def test_a_full_queue_refuses_only_when_none_of_the_call_is_queued(runtime):
    release = hold_the_worker(runtime)
    try:
        for i in range(4):
            runtime.submit("t", {}, body(i))
        with pytest.raises(Overloaded):
            asyncio.run(runtime.run_sync("t", [({}, body("x"))]))
    finally:
        release.set()


def test_a_failing_job_fails_the_call_and_leaves_nothing_queued(runtime):
    """The rest is canceled if still queued; one the worker reached first may have run."""

    def failing():
        raise BadRequest("item 0 is bad")

    async def scenario():
        release = hold_the_worker(runtime)
        call = asyncio.ensure_future(
            runtime.run_sync("t", [({}, failing), *[({"i": i}, body(i)) for i in range(1, 6)]])
        )
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(BadRequest, match="item 0 is bad"):
            await call

    asyncio.run(scenario())
    jobs = [j for j in runtime.jobs.list() if j["type"] == "t"]
    assert len(jobs) == 2  # the window: the call never queued more than 4 // 2
    statuses = sorted(j["status"] for j in jobs)
    assert statuses in (["canceled", "failed"], ["failed", "succeeded"])


def test_a_timeout_names_the_first_unfinished_job_and_leaves_it_running(tmp_path):
    rt = Runtime(
        Settings(_env_file=None, files_root=tmp_path, warmup="none", sync_timeout_s=0.2),
        warmup=[],
    )
    rt.start()
    gate = threading.Event()
    try:

        def slow():
            gate.wait(10)
            return JobOutput(result={})

        with pytest.raises(SyncTimeout) as err:
            asyncio.run(rt.run_sync("t", [({}, body(0)), ({}, slow)]))
        job = rt.jobs.snapshot(err.value.job_id)
        assert job["status"] == "running"  # it keeps running
        gate.set()
    finally:
        gate.set()
        rt.stop()


def test_a_departed_client_cancels_what_is_still_queued(runtime):
    async def scenario():
        release = hold_the_worker(runtime)
        gone = asyncio.Event()

        async def client_gone():
            await gone.wait()

        call = asyncio.ensure_future(
            runtime.run_sync("t", [({}, body(0)), ({}, body(1))], client_gone=client_gone)
        )
        await asyncio.sleep(0.05)
        gone.set()
        with pytest.raises(ClientGone):
            await call
        release.set()

    asyncio.run(scenario())
    statuses = [j["status"] for j in runtime.jobs.list() if j["type"] == "t"]
    assert statuses == [CANCELED, CANCELED]
