"""What ``kiapi serve`` sets for the whole process before it serves."""

from __future__ import annotations

import sys

import pytest

from kiapi import cli
from kiapi.config import Settings


@pytest.fixture
def switch_interval(monkeypatch):
    """Python's switch interval restored afterwards; no setting from the environment."""
    monkeypatch.delenv("KIAPI_GIL_SWITCH_INTERVAL_US", raising=False)
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_gil_switch_interval_comes_from_the_setting_in_microseconds(
    monkeypatch, switch_interval
):
    monkeypatch.setenv("KIAPI_GIL_SWITCH_INTERVAL_US", "300")
    cli.tune_interpreter(Settings(_env_file=None))
    assert sys.getswitchinterval() == pytest.approx(300e-6)


def test_by_default_a_waiting_worker_gets_the_gil_sooner_than_python_lets_it(switch_interval):
    cli.tune_interpreter(Settings(_env_file=None))
    assert sys.getswitchinterval() == pytest.approx(200e-6)  # Python's own: 5 ms


@pytest.mark.parametrize("value", ["0", "-5", "1e9"])
def test_a_switch_interval_out_of_range_is_refused(monkeypatch, value):
    monkeypatch.setenv("KIAPI_GIL_SWITCH_INTERVAL_US", value)
    with pytest.raises(ValueError, match="gil_switch_interval_us"):
        Settings(_env_file=None)
