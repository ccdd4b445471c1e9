"""The engine table's start-up prefetch: imports on a side thread, failures left to the load."""

from __future__ import annotations

import sys

from kiapi.runtime import engines


def test_prefetch_imports_what_the_engines_need_and_survives_a_missing_module(monkeypatch):
    monkeypatch.setitem(
        engines.REQUIRES, "test-engine", ("no_such_module_for_kiapi", "colorsys", "colorsys")
    )
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    thread = engines.prefetch(["test-engine", "unknown-engine"])
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.daemon
    assert "colorsys" in sys.modules  # imported after the missing one failed
    assert "no_such_module_for_kiapi" not in sys.modules
