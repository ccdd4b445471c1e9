"""The worker's step runners (continuous batching's shape) and the chat text stream."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiapi.runtime.chat import TextStream
from kiapi.runtime.jobs import JobStore
from kiapi.runtime.worker import JobOutput, Joinable, Worker
from tests.support import wait_until


class CountingRunner:
    """Each member emits ``n`` steps and finishes; the log records what the worker did."""

    def __init__(self, log: list, opened: list) -> None:
        self.log = log
        self.members: dict[str, list] = {}
        opened.append(self)
        self.closed = False

    @property
    def busy(self) -> bool:
        return bool(self.members)

    def join(self, job, item) -> None:
        if item == "bad":
            raise ValueError("refused")
        self.members[job.id] = [job, item, 0]
        self.log.append(("join", item))

    def step(self):
        time.sleep(0.002)  # a decode step takes time: others can join meanwhile
        self.log.append(("step", sorted(m[1] for m in self.members.values())))
        done = []
        for key, member in list(self.members.items()):
            member[2] += 1
            if member[2] >= member[1]:
                done.append((member[0], JobOutput(result={"steps": member[2]})))
                del self.members[key]
        return done

    def stop(self, job) -> bool:
        return False  # (chat's runner is tested through the API)

    def close(self, reason):
        self.closed = True
        left = [(m[0], reason) for m in self.members.values()]
        self.members.clear()
        return left


@pytest.fixture
def store():
    return JobStore(max_finished=100)


class Harness:
    """A started worker and what its counting runners record."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.log: list = []
        self.opened: list[CountingRunner] = []
        self.worker = Worker(store, max_queue=10)

    def submit(self, item, job_type: str = "chat"):
        job = self.store.create(job_type, {})
        body = Joinable(
            key="m", item=item, open_runner=lambda: CountingRunner(self.log, self.opened)
        )
        self.worker.submit(job, body)
        return job


@pytest.fixture
def harness(store):
    h = Harness(store)
    h.worker.start()
    yield h
    h.worker.stop()


def test_jobs_join_a_running_runner_between_steps_and_leave_when_done(harness):
    first = harness.submit(300)
    wait_until(lambda: ("step", [300]) in harness.log)
    second = harness.submit(3)
    assert second.future.result(5).result == {"steps": 3}
    assert first.future.result(5).result == {"steps": 300}
    log, opened = harness.log, harness.opened
    wait_until(lambda: opened[0].closed)
    assert len(opened) == 1  # one runner for the key, closed once idle
    joined = log.index(("join", 3))
    assert ("step", [3, 300]) in log[joined:]  # both advanced in the same steps
    assert log[0] == ("join", 300) and joined > 1  # the second joined while the first ran


def test_a_plain_job_runs_between_two_steps(harness, store):
    long = harness.submit(200)
    wait_until(lambda: ("step", [200]) in harness.log)
    plain = store.create("embedding", {})

    def body():
        harness.log.append(("plain", None))
        return JobOutput(result={})

    harness.worker.submit(plain, body)
    plain.future.result(5)
    before = harness.log[: harness.log.index(("plain", None))]
    assert long.status == "running" and sum(e[0] == "step" for e in before) < 200
    long.future.result(10)


def test_batches_do_not_wait_for_mates_while_a_runner_steps(store):
    """After a batch of several jobs the worker may wait for as many again (fill_wait_s), but
    not while a continuous batch is decoding: its steps would stall for the wait."""
    from kiapi.runtime.worker import Batchable, BatchPolicy

    harness = Harness(store)
    harness.worker = Worker(store, max_queue=20, batch=BatchPolicy(fill_wait_s=5.0))
    harness.worker.start()
    try:
        calls = []

        def embed(items):
            calls.append(list(items))
            return [JobOutput(result={"n": i}) for i in items]

        def batch(items):
            return [
                harness.worker.submit(store.create("e", {}), Batchable("k", i, embed))
                for i in items
            ]

        long = harness.submit(10_000)
        wait_until(lambda: ("step", [10_000]) in harness.log)
        for future in batch([1, 2, 3]):  # queued together: a batch of several
            future.result(5)
        started = time.monotonic()
        assert batch([4])[0].result(5).result == {"n": 4}  # one job, no mates coming
        assert time.monotonic() - started < 2.0  # no 5 s wait for them
        assert long.status == "running"
    finally:
        harness.worker.stop()


def test_a_refused_join_fails_only_that_job(harness):
    good, bad = harness.submit(5), harness.submit("bad")
    with pytest.raises(ValueError, match="refused"):
        bad.future.result(5)
    assert good.future.result(5).result == {"steps": 5}
    assert bad.status == "failed" and good.status == "succeeded"


def test_stopping_the_worker_ends_runner_members_with_a_503(store):
    harness = Harness(store)
    harness.worker.start()
    job = harness.submit(10**9)
    wait_until(lambda: any(e[0] == "step" for e in harness.log))
    harness.worker.stop()
    error = job.future.exception(5)
    assert error.status == 503 and harness.opened[0].closed


# -- the chat text stream ---------------------------------------------------------------
def char_stream(stops):
    """A stream over a tokenizer with one character per token (ids are code points)."""
    return TextStream(lambda ids: "".join(map(chr, ids)), tuple(stops))


@settings(max_examples=300, derandomize=True)
@given(
    st.text(alphabet="ab c", min_size=0, max_size=30),
    st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=0, max_size=3),
)
def test_stop_strings_are_cut_exactly_and_no_part_is_ever_sent(text, stops):
    stream = char_stream(stops)
    sent = ""
    for char in text:
        sent += stream.push(ord(char))
        if stream.stopped:
            break
    sent += stream.flush()
    # generation ends once a stop string is complete; the text is cut where the earliest
    # stop string seen by then begins
    ends = [n for n in range(len(text) + 1) if any(s in text[:n] for s in stops)]
    seen = text[: ends[0]] if ends else text
    cuts = [seen.find(s) for s in stops if s in seen]
    assert sent == (seen[: min(cuts)] if cuts else text)
    assert stream.stopped == bool(cuts)


def test_held_back_text_is_sent_when_it_turns_out_not_to_be_a_stop():
    stream = char_stream(["abc"])
    assert stream.push(ord("x")) == "x"
    assert stream.push(ord("a")) == ""  # could be the start of "abc"
    assert stream.push(ord("b")) == ""
    assert stream.push(ord("d")) == "abd"  # it was not
    assert not stream.stopped


def test_half_a_character_waits_for_its_other_bytes():
    pieces = {1: b"\xc3", 2: b"\xa9", 3: b"!"}
    stream = TextStream(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace"), ())
    assert stream.push(1) == ""
    assert stream.push(2) == "é"
    assert stream.push(3) == "!"
