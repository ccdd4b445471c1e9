"""``kiapi doctor``: what this machine gives kiapi, and what to fix.

Each check is a :class:`Check` (ok, to fix, or - for a model nobody asked for that is not set
up - only information, with a detail line); the command prints them as a table and exits 1 if
any check failed. It uses the same settings, BLAS loading and model
registry as the server, and imports MLX the way the server does (after the BLAS is loaded).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiapi.config import Settings, physical_memory_gb
from kiapi.runtime import blas, qmatmul
from kiapi.runtime.catalog import CAPABILITIES, default_registry
from kiapi.runtime.errors import ModelNotSetUp


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: information, neither passed nor failed
    detail: str


def _files_root(settings: Settings) -> Check:
    root = settings.files_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        return Check("files root", False, f"{root} is not writable: {exc} (set KIAPI_FILES_ROOT)")
    free_gb = shutil.disk_usage(root).free / 1024**3
    return Check("files root", True, f"{root} (writable, {free_gb:.1f} GB free)")


def checks(settings: Settings) -> list[Check]:
    status = blas.activate(settings.blas)
    qmatmul.configure(settings.matmul_precision)
    from kiapi.runtime import mlx_engine  # imports MLX after the BLAS, as the server does

    found = [
        Check(
            "platform",
            True,
            f"{platform.platform()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {physical_memory_gb():.1f} GB RAM",
        ),
        Check("mlx", True, mlx_engine.describe_device()),
        Check("blas", status.optimized, status.describe()),
        Check(
            "matmul",
            status.optimized,
            f"{mlx_engine.sgemm_gflops():.1f} GFLOP/s (1024x1024 fp32 through MLX; "
            "~5 on the reference BLAS, ~180 with OpenBLAS on 2 Zen 4 cores)",
        ),
        Check("cpu kernel", True if qmatmul.kernel() else None, qmatmul.describe()),
        _files_root(settings),
        Check("memory budget", True, f"{settings.memory_limit_gb:.2f} GB (KIAPI_MEMORY_LIMIT_GB)"),
    ]
    registry = default_registry(settings.model_paths, settings.models_file)
    found.append(
        Check(
            "model catalog",
            not registry.problems,
            f"{settings.models_file}"
            + ("" if Path(settings.models_file).expanduser().exists() else " (none)")
            + "".join(f"; skipped: {p}" for p in registry.problems),
        )
    )
    for cap in CAPABILITIES:
        found.extend(_models(registry, cap.family, getattr(settings, cap.default_setting)))
    return found


def _models(registry, family: str, preferred: str | None) -> list[Check]:
    """A line per model of ``family`` (set up or how to), then its default."""
    note = registry.choose_default(family, preferred)
    default = registry.default(family)
    if default is None:  # a capability with no built-in model (rerank): optional
        return [Check(f"{family} default", None, f"no {family} model in the catalog (optional; "
                      "add one with `kiapi models add PATH`)")]  # fmt: skip
    found, usable = [], 0
    for spec in registry.models(family):
        marker = " [default]" if spec is default else ""
        try:
            spec.require_set_up()
        except ModelNotSetUp as exc:
            ok = False if spec is default else None  # the default must serve; others may not
            found.append(Check(f"model {spec.name}", ok, f"not set up{marker}: {exc.hint}"))
            continue
        usable += 1
        found.append(
            Check(
                f"model {spec.name}",
                True,
                f"set up{marker}, {spec.estimated_weight_gb():.3f} GB of weights",
            )
        )
    found.append(
        Check(
            f"{family} default",
            usable > 0,
            (note or default.name) if usable else f"no {family} model is set up",
        )
    )
    return found


def main(settings: Settings) -> int:
    results = checks(settings)
    width = max(len(c.name) for c in results)
    for check in results:
        mark = {True: "ok ", False: "FIX", None: "-- "}[check.ok]
        print(f"{mark} {check.name:<{width}}  {check.detail}")
    failed = [c.name for c in results if c.ok is False]
    print(f"\n{'problems: ' + ', '.join(failed) if failed else 'all checks passed'}")
    sys.stdout.flush()
    return 1 if failed else 0
