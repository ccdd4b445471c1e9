"""ReleaseWhenQuiet: memory is handed back once, after the last request, never mid-request."""

import asyncio
import sys

import pytest

from kiapi.http.quiet import ReleaseWhenQuiet
from kiapi.runtime import heap


def make(quiet_s=0.05):
    released = []
    gates: list[asyncio.Event] = []

    async def app(scope, receive, send):
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()

    mw = ReleaseWhenQuiet(app, quiet_s=quiet_s, release=lambda: released.append(1))
    return mw, released, gates


async def request(mw):
    await mw({"type": "http"}, None, None)


def test_released_once_after_the_last_request_ends():
    async def scenario():
        mw, released, gates = make()
        first = asyncio.create_task(request(mw))
        second = asyncio.create_task(request(mw))
        await asyncio.sleep(0.01)
        gates[0].set()
        await first
        await asyncio.sleep(0.1)
        assert released == []  # one request still in flight
        gates[1].set()
        await second
        await asyncio.sleep(0.1)
        assert released == [1]
        await asyncio.sleep(0.1)
        assert released == [1]  # once per quiet period

    asyncio.run(scenario())


def test_a_request_within_the_quiet_time_postpones_the_release():
    async def scenario():
        mw, released, gates = make(quiet_s=0.1)
        task = asyncio.create_task(request(mw))
        await asyncio.sleep(0.01)
        gates[0].set()
        await task
        await asyncio.sleep(0.05)
        task = asyncio.create_task(request(mw))  # arrives before the first timer fires
        await asyncio.sleep(0.1)
        assert released == []  # the first timer saw the newer request
        gates[1].set()
        await task
        await asyncio.sleep(0.15)
        assert released == [1]

    asyncio.run(scenario())


def test_a_failing_release_is_logged_not_raised(caplog):
    async def scenario():
        async def app(scope, receive, send):
            return None

        def broken():
            raise OSError("no")

        mw = ReleaseWhenQuiet(app, quiet_s=0.01, release=broken)
        await request(mw)
        await asyncio.sleep(0.05)
        await request(mw)  # still serving

    asyncio.run(scenario())
    assert "releasing memory when quiet failed" in caplog.text


def test_lifespan_and_other_scopes_pass_through_uncounted():
    async def scenario():
        seen = []

        async def app(scope, receive, send):
            seen.append(scope["type"])

        mw = ReleaseWhenQuiet(app, quiet_s=0.01, release=lambda: seen.append("released"))
        await mw({"type": "lifespan"}, None, None)
        await asyncio.sleep(0.05)
        assert seen == ["lifespan"]
        assert mw.in_flight == 0

    asyncio.run(scenario())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_heap_trim_hands_freed_pages_back():
    """A freed 64 MiB of small allocations is (mostly) returned by ``trim``."""
    psutil = pytest.importorskip("psutil")
    if not heap.can_trim():
        pytest.skip("not glibc")
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(1024)]  # below the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    keep = blocks[-1]  # pins the heap top, so only trim (not free) can return the rest
    for block in blocks[:-1]:
        libc.free(block)
    before = psutil.Process().memory_info().rss
    heap.trim()
    after = psutil.Process().memory_info().rss
    libc.free(keep)
    assert before - after > 32 * 1024**2


def test_arena_limit_is_taken_by_glibc_and_zero_leaves_the_default():
    import subprocess

    code = (
        "from kiapi.runtime import heap; "
        "print(heap.limit_arenas(0), heap.limit_arenas(1), heap.can_trim())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if heap.can_trim():  # glibc
        assert out.stdout.split() == ["False", "True", "True"]
    else:
        assert out.stdout.split()[:2] == ["False", "False"]
