"""Issue 14's probes, each against one real ``kiapi serve`` subprocess (``bench/hostile.py``
defines them and prints their table with timings; ``python bench/hostile.py``).

A probe passes when the answer is right: status, envelope, size, memory, no job queued. Its
time goal (``/health`` within 100 ms while the largest bad body is refused, a 16 MB text
under a second more than a short one) is the benchmark's to judge; here it is only bounded at
five times the goal, which catches the regressions these probes found (seconds to a minute)."""

from __future__ import annotations

import pytest

from bench import hostile

REGRESSION_FACTOR = 5


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with hostile.kiapi_serve(tmp_path_factory.mktemp("hostile"), **hostile.SERVER_ENV) as server:
        yield server


@pytest.mark.parametrize("probe", hostile.PROBES, ids=lambda p: f"{p.defect}-{p.name}")
def test_probe(live, probe):
    outcome = probe.run(live)
    assert outcome.ok, outcome
    if probe.goal_s is not None:
        judged = outcome.seconds if outcome.judged_s is None else outcome.judged_s
        assert judged <= probe.goal_s * REGRESSION_FACTOR, outcome
