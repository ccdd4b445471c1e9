"""Spec drift tooling: which operationIds lack a handler, and scaffolding the missing ones.

Convention: ``<specs_dir>/<name>.json`` is served by module ``<package>.<name>``, one function
per operationId with the same name. ``check`` compares the two; ``scaffold`` appends stubs for
missing operations to the module file and never touches existing code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiapi.specs import SPECS_DIR, load_served, operations

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Drift:
    spec: str
    module: str
    missing: list[str] = field(default_factory=list)  # operationIds without a handler
    orphans: list[str] = field(default_factory=list)  # handlers without an operation

    @property
    def clean(self) -> bool:
        return not self.missing and not self.orphans


def spec_files(specs_dir: Path) -> list[Path]:
    return sorted(p for p in specs_dir.glob("*.json") if p.is_file())


def _module_file(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    return Path(spec.origin) if spec and spec.origin else None


def defined_handlers(module_name: str) -> set[str]:
    """Public functions defined in the module itself (imports do not count)."""
    path = _module_file(module_name)
    if path is None:
        return set()
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and not node.name.startswith("_")
    }


def check(specs_dir: Path = SPECS_DIR, package: str = "kiapi.handlers") -> list[Drift]:
    report = []
    for path in spec_files(specs_dir):
        module = f"{package}.{path.stem}"
        served = load_served(path.stem, specs_dir)  # additions may add operations (/metrics)
        op_ids = {op["operationId"] for _m, _p, op in operations(served) if "operationId" in op}
        handlers = defined_handlers(module)
        report.append(
            Drift(path.stem, module, sorted(op_ids - handlers), sorted(handlers - op_ids))
        )
    return report


def _stub(method: str, path: str, op: dict[str, Any], spec_name: str) -> str:
    params = [p["name"] for p in op.get("parameters", []) if IDENTIFIER.match(p.get("name", ""))]
    if "requestBody" in op:
        params.append("body")
    signature = ", ".join(f"{p}=None" for p in params)
    summary = (op.get("summary") or "").replace('"""', "'''")
    return (
        f"\n\nasync def {op['operationId']}({signature}):\n"
        f'    """{method.upper()} {path} — {summary} (scaffolded from specs/{spec_name}.json)."""\n'
        f'    raise NotImplementedError("{op["operationId"]} is not implemented yet")\n'
    )


def scaffold(specs_dir: Path = SPECS_DIR, package: str = "kiapi.handlers") -> dict[str, list[str]]:
    """Append stubs for missing operationIds; returns ``{module file: [operationIds added]}``."""
    written: dict[str, list[str]] = {}
    for drift in check(specs_dir, package):
        if not drift.missing:
            continue
        spec = load_served(drift.spec, specs_dir)
        ops = {
            op["operationId"]: (m, p, op) for m, p, op in operations(spec) if "operationId" in op
        }
        path = _module_file(drift.module)
        if path is None:
            package_dir = Path(inspect.getfile(importlib.import_module(package))).parent
            path = package_dir / f"{drift.spec}.py"
            path.write_text(f'"""Handlers of ``specs/{drift.spec}.json``."""\n')
        existing = path.read_text()
        stubs = "".join(_stub(*ops[op_id], drift.spec) for op_id in drift.missing)
        path.write_text(existing.rstrip("\n") + "\n" + stubs)
        written[str(path)] = list(drift.missing)
        sys.modules.pop(drift.module, None)
        importlib.invalidate_caches()
    return written
