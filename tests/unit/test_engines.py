"""The engine table's start-up prefetch: imports on a side thread, awaited by the load."""

from __future__ import annotations

import sys

from kiapi.runtime import engines


def test_prefetch_imports_on_a_side_thread_and_the_load_waits_for_it(monkeypatch):
    monkeypatch.setitem(
        engines.PREFETCH, "test-engine", ("no_such_module_for_kiapi", "colorsys", "colorsys")
    )
    monkeypatch.setattr(engines, "_prefetching", {})
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    engines.prefetch(["test-engine", "unknown-engine", "test-engine"])
    (thread,) = set(engines._prefetching.values())
    assert thread.daemon and thread.name == "kiapi-prefetch"

    seen = {}
    monkeypatch.setattr(engines, "loader_of", lambda engine: lambda spec: seen.setdefault(
        "alive", thread.is_alive()))  # fmt: skip

    class Spec:
        name, engine = "m", "test-engine"

        def require_set_up(self):
            pass

    engines.load(Spec())
    assert seen == {"alive": False}  # the load ran only once the prefetch had ended
    assert "colorsys" in sys.modules  # imported after the missing one failed
    assert "no_such_module_for_kiapi" not in sys.modules
