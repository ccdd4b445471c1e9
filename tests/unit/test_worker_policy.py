"""The worker thread runs under SCHED_BATCH when told to (the runtime's default), the threads it
starts inherit it (MLX's stream threads among them), and the thread that starts it keeps its
own policy."""

import os
import sys
import threading

import pytest

from kiapi.config import Settings
from kiapi.runtime.core import Runtime
from kiapi.runtime.jobs import JobStore
from kiapi.runtime.worker import JobOutput, Worker, enter_sched_batch


def sched_batch_allowed() -> bool:
    """Whether this system lets a thread take SCHED_BATCH (a throwaway thread asks)."""
    allowed: list[bool] = []
    thread = threading.Thread(target=lambda: allowed.append(enter_sched_batch()))
    thread.start()
    thread.join()
    return allowed[0]


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not sched_batch_allowed(),
    reason="needs Linux's SCHED_BATCH, allowed to this process",
)


def policies_seen_by_a_job(worker: Worker, store: JobStore) -> dict:
    """The worker thread's policy, that of a thread it starts, and that of the thread MLX
    starts for a new stream's first evaluation, all read inside one job."""

    def run():
        from kiapi.runtime.mlx_import import import_mlx

        mx = import_mlx()
        before = set(os.listdir("/proc/self/task"))
        stream = mx.new_stream(mx.cpu)
        mx.eval(mx.add(mx.array(1), 1, stream=stream))  # MLX starts the stream's thread here
        started = set(os.listdir("/proc/self/task")) - before
        child: dict = {}
        thread = threading.Thread(
            target=lambda: child.setdefault("policy", os.sched_getscheduler(0))
        )
        thread.start()
        thread.join()
        return JobOutput(
            result={
                "worker": os.sched_getscheduler(0),
                "child": child["policy"],
                "mlx": [os.sched_getscheduler(int(tid)) for tid in started],
            }
        )

    return worker.submit(store.create("t", {}), run).result(30).result


@pytest.mark.parametrize("sched_batch", [True, False])
def test_the_worker_and_the_threads_it_starts_take_the_policy(sched_batch):
    store = JobStore(max_finished=10)
    worker = Worker(store, max_queue=2, sched_batch=sched_batch)
    caller = os.sched_getscheduler(0)
    worker.start()
    try:
        seen = policies_seen_by_a_job(worker, store)
    finally:
        worker.stop()
    expected = os.SCHED_BATCH if sched_batch else os.SCHED_OTHER
    assert seen["worker"] == seen["child"] == expected
    assert seen["mlx"] == [expected]  # exactly one new thread: the stream's
    assert os.sched_getscheduler(0) == caller  # this thread is left alone


def test_the_runtime_worker_runs_under_sched_batch_by_default(tmp_path):
    runtime = Runtime(Settings(_env_file=None, files_root=tmp_path, warmup="none"), warmup=[])
    runtime.start()
    try:
        job = runtime.jobs.create("t", {})
        body = lambda: JobOutput(result={"policy": os.sched_getscheduler(0)})  # noqa: E731
        seen = runtime.worker.submit(job, body).result(30).result
        assert seen["policy"] == os.SCHED_BATCH  # read on the worker, once it has started
        assert os.sched_getscheduler(0) != os.SCHED_BATCH  # the caller's thread: untouched
    finally:
        runtime.stop()
