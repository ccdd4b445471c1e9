import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kiapi.app import create_app
from kiapi.devtools import check, scaffold
from kiapi.specs import SPEC_SOURCES, load_served, operations


def test_every_operation_id_has_a_handler():
    report = check()
    assert {d.spec for d in report} >= {s.name for s in SPEC_SOURCES}
    for drift in report:
        assert drift.clean, (drift.missing, drift.orphans)


def test_every_served_operation_resolves_to_a_coroutine():
    import importlib
    import inspect

    for source in SPEC_SOURCES:
        module = importlib.import_module(source.handler_module)
        for _m, _p, op in operations(load_served(source.name)):
            assert inspect.iscoroutinefunction(getattr(module, op["operationId"]))


def test_missing_handler_fails_startup(settings, monkeypatch):
    import kiapi.handlers.common as common

    monkeypatch.delattr(common, "list_jobs_v1_jobs_get")
    with (
        pytest.raises(Exception, match="list_jobs_v1_jobs_get"),
        TestClient(create_app(settings), base_url="http://127.0.0.1"),
    ):
        pass


@pytest.fixture
def toy_project(tmp_path, monkeypatch):
    """A spec dir and handler package outside kiapi, with one handled and one new operation."""
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "toy", "version": "1"},
        "paths": {
            "/things": {
                "get": {"operationId": "list_things", "responses": {"200": {"description": "ok"}}}
            },
            "/things/{thing_id}": {
                "post": {
                    "operationId": "poke_thing",
                    "summary": "Poke",
                    "parameters": [
                        {
                            "name": "thing_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "content": {"application/json": {"schema": {"type": "object"}}}
                    },
                    "responses": {"200": {"description": "ok"}},
                }
            },
        },
    }
    (specs / "toy.json").write_text(json.dumps(spec))
    pkg = tmp_path / "toyhandlers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    existing = textwrap.dedent('''\
        """Toy handlers."""


        async def list_things():
            return []


        def orphan_helper():
            return 1
        ''')
    (pkg / "toy.py").write_text(existing)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "toyhandlers"]:
        monkeypatch.delitem(sys.modules, name)
    return specs, pkg, existing


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kiapi", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


def test_check_reports_drift_and_exits_1(toy_project, tmp_path):
    specs, _pkg, _ = toy_project
    [drift] = check(specs, "toyhandlers")
    assert drift.missing == ["poke_thing"] and drift.orphans == ["orphan_helper"]
    result = run_cli(
        "handlers", "check", "--specs-dir", str(specs), "--package", "toyhandlers", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "missing handler: toyhandlers.toy.poke_thing" in result.stdout
    assert "handler without operation: toyhandlers.toy.orphan_helper" in result.stdout


def test_scaffold_appends_stubs_and_keeps_existing_code(toy_project):
    specs, pkg, existing = toy_project
    written = scaffold(specs, "toyhandlers")
    assert list(written.values()) == [["poke_thing"]]
    text = (pkg / "toy.py").read_text()
    assert text.startswith(existing)
    assert "async def poke_thing(thing_id=None, body=None):" in text
    compile(text, "toy.py", "exec")
    assert check(specs, "toyhandlers")[0].missing == []
    assert scaffold(specs, "toyhandlers") == {}  # idempotent
    assert (pkg / "toy.py").read_text() == text


def test_cli_check_passes_on_the_real_project():
    result = run_cli("handlers", "check", cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout + result.stderr
