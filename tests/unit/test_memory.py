import pytest

from kiapi.runtime.errors import BudgetExceeded, ModelNotSetUp
from kiapi.runtime.memory import MemoryManager
from kiapi.runtime.registry import LoadedModel, ModelSpec
from tests.support import FakeClock


class RecordingLoader:
    """Loads a placeholder object per spec and records loads and unloads (no inference here)."""

    def __init__(self, measured: dict[str, float] | None = None) -> None:
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.measured = measured or {}

    def __call__(self, spec: ModelSpec) -> LoadedModel:
        self.loads.append(spec.name)
        weight = self.measured.get(spec.name, spec.weight_gb)
        return LoadedModel(
            model=f"model:{spec.name}",
            weight_gb=weight,
            unload=lambda: self.unloads.append(spec.name),
        )


def spec(name, weight, *, headroom=0.0, priority=0, ttl=None):
    return ModelSpec(
        name=name,
        family="f",
        domain="d",
        repo=f"r/{name}",
        weight_gb=weight,
        peak_headroom_gb=headroom,
        priority=priority,
        ttl_s=ttl,
    )


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def loader():
    return RecordingLoader()


def manager(loader, clock, budget=10.0, ttl=100.0):
    return MemoryManager(budget, default_ttl_s=ttl, loader=loader, clock=clock)


def test_acquire_loads_once_and_returns_model(loader, clock):
    mm = manager(loader, clock)
    a = spec("a", 2)
    with mm.use(a) as model:
        assert model == "model:a"
    with mm.use(a):
        pass
    assert loader.loads == ["a"]
    assert mm.snapshot()["resident_gb"] == 2


def test_eviction_order_is_priority_then_lru(loader, clock):
    mm = manager(loader, clock, budget=10)
    low_old, low_new, high = spec("low_old", 3), spec("low_new", 3), spec("high", 3, priority=5)
    for s in (high, low_old, low_new):
        with mm.use(s):
            clock.advance(1)
    # high priority was used first (oldest) but must outlive both priority-0 models
    with mm.use(spec("big", 4)):
        pass
    assert loader.unloads == ["low_old"]
    with mm.use(spec("bigger", 7)):
        pass
    assert loader.unloads == ["low_old", "low_new", "big"]
    assert {m["name"] for m in mm.snapshot()["loaded"]} == {"high", "bigger"}
    assert mm.evictions["budget"] == 3


def test_peak_headroom_counts_against_budget(loader, clock):
    mm = manager(loader, clock, budget=10)
    with mm.use(spec("a", 5)):
        pass
    with mm.use(spec("b", 4, headroom=2)):  # 5 + 4 + 2 > 10: a must go
        pass
    assert loader.unloads == ["a"]


def test_model_in_use_is_never_evicted_and_nothing_is_evicted_on_refusal(loader, clock):
    mm = manager(loader, clock, budget=10)
    idle = spec("idle", 2)
    with mm.use(idle):
        pass
    busy = spec("busy", 6)
    mm.acquire(busy)
    with pytest.raises(BudgetExceeded) as err:
        mm.acquire(spec("c", 5))  # would need busy gone: refused without evicting idle
    assert "in use: busy" in err.value.detail
    assert loader.unloads == []
    assert {m["name"] for m in mm.snapshot()["loaded"]} == {"idle", "busy"}
    mm.release(busy)


def test_model_larger_than_budget_is_refused_without_evicting(loader, clock):
    mm = manager(loader, clock, budget=10)
    with mm.use(spec("a", 3)):
        pass
    with pytest.raises(BudgetExceeded) as err:
        mm.acquire(spec("huge", 9, headroom=2))
    assert err.value.status == 503 and "KIAPI_MEMORY_LIMIT_GB" in err.value.hint
    assert loader.unloads == [] and loader.loads == ["a"]


def test_measured_weight_over_estimate_evicts_more_or_gives_up(clock):
    loader = RecordingLoader(measured={"liar": 8.0})
    mm = manager(loader, clock, budget=10)
    with mm.use(spec("a", 3)):
        pass
    with mm.use(spec("liar", 1)):  # planned at 1 GB, turns out 8: a must go after loading
        pass
    assert loader.unloads == ["a"]
    assert mm.snapshot()["resident_gb"] == 8.0


def test_ttl_expiry_with_fake_clock(loader, clock):
    mm = manager(loader, clock, ttl=100)
    short, pinned = spec("short", 1, ttl=10), spec("pinned", 1, ttl=0)
    default = spec("default", 1)
    for s in (short, pinned, default):
        with mm.use(s):
            pass
    clock.advance(9.9)
    assert mm.sweep() == []
    clock.advance(0.1)
    assert mm.sweep() == ["short"]
    clock.advance(90)
    assert mm.sweep() == ["default"]
    clock.advance(10_000)
    assert mm.sweep() == []
    [entry] = mm.snapshot()["loaded"]
    assert entry["name"] == "pinned" and entry["ttl_s"] is None and entry["expires_in_s"] is None
    assert mm.evictions["ttl"] == 2


def test_ttl_never_expires_a_model_in_use(loader, clock):
    mm = manager(loader, clock, ttl=10)
    a = spec("a", 1)
    mm.acquire(a)
    clock.advance(1000)
    assert mm.sweep() == []
    mm.release(a)
    clock.advance(10)
    assert mm.sweep() == ["a"]


def test_snapshot_reports_idle_and_expiry(loader, clock):
    mm = manager(loader, clock, ttl=100)
    with mm.use(spec("a", 1.5, priority=2)):
        pass
    clock.advance(30)
    snap = mm.snapshot()
    assert snap["budget_gb"] == 10.0 and snap["resident_gb"] == 1.5
    [entry] = snap["loaded"]
    assert entry == {
        "name": "a",
        "family": "f",
        "domain": "d",
        "repo": "r/a",
        "weight_gb": 1.5,
        "priority": 2,
        "idle_s": 30.0,
        "ttl_s": 100.0,
        "expires_in_s": 70.0,
    }


def test_spec_without_loader_is_not_set_up(clock):
    mm = MemoryManager(10, default_ttl_s=10, clock=clock)  # production loader
    s = ModelSpec(
        name="x", family="f", domain="d", repo="r/x", set_up_hint="run kiapi models pull x"
    )
    with pytest.raises(ModelNotSetUp) as err:
        mm.acquire(s)
    assert err.value.status == 503 and err.value.hint == "run kiapi models pull x"


def test_release_without_acquire_is_a_bug(loader, clock):
    with pytest.raises(RuntimeError):
        manager(loader, clock).release(spec("a", 1))


def test_working_memory_is_admitted_against_the_budget_and_given_back(loader, clock):
    mm = manager(loader, clock, budget=4.0)
    chat, other = spec("chat", 1.0), spec("other", 2.0)
    mm.acquire(other)
    mm.release(other)  # idle: evictable
    mm.acquire(chat)
    mm.reserve(chat, 0.5, "a KV cache")
    assert mm.snapshot()["resident_gb"] == pytest.approx(3.5)
    mm.reserve(chat, 1.0, "a second KV cache")  # evicts the idle model to fit
    assert "other" in loader.unloads
    with pytest.raises(BudgetExceeded, match="a third KV cache needs 2.000 GB") as refused:
        mm.reserve(chat, 2.0, "a third KV cache")
    assert refused.value.retry_after_s == 5
    mm.unreserve(chat, 1.5)
    assert mm.snapshot()["resident_gb"] == pytest.approx(1.0)
    mm.reserve(chat, 2.0, "now it fits")


def test_a_model_with_reserved_memory_is_never_evicted(loader, clock):
    mm = manager(loader, clock, budget=3.0)
    chat = spec("chat", 1.0)
    mm.acquire(chat)
    mm.reserve(chat, 1.0, "a stream")
    with pytest.raises(BudgetExceeded, match="in use: chat"):
        mm.acquire(spec("big", 1.5))
    assert loader.unloads == []


def test_peek_returns_a_resident_model_without_using_it(loader, clock):
    mm = manager(loader, clock)
    chat = spec("chat", 1.0)
    assert mm.peek(chat) is None
    with mm.use(chat):
        pass
    assert mm.peek(chat) == "model:chat"
    assert loader.loads == ["chat"]


def test_ready_means_acquire_would_neither_load_nor_evict(loader, clock):
    """What may run inside another job's step: a resident model, no other resident past its
    TTL (acquire sweeps first), and room without a victim; asking changes nothing."""
    mm = manager(loader, clock, budget=10.0, ttl=100.0)
    a, b, c = spec("a", 3), spec("b", 3, headroom=3), spec("c", 2)
    assert not mm.ready(a)  # not loaded
    for s in (a, b, c):
        with mm.use(s):
            pass
    assert loader.unloads == []  # 8 GB held
    assert mm.ready(a) and mm.ready(c)
    assert not mm.ready(b)  # its 3 GB of headroom beside the other 5: a would be evicted
    clock.advance(60)
    with mm.use(a):
        pass
    clock.advance(50)  # b and c are past their TTL, a is not: acquire(a) would sweep them
    assert not mm.ready(a)
    assert loader.loads == ["a", "b", "c"] and loader.unloads == []
    mm.sweep()
    assert mm.ready(a) and loader.unloads == ["b", "c"]
