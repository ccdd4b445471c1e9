"""requirements.lock is current with pyproject.toml: every requirement of kiapi and of its
test, lint and vl extras that applies here is pinned in the lock to a version it accepts, and
every pin carries a hash. (scripts/lock.sh regenerates the lock.)"""

import re
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked_pins(lock: str = "requirements.lock") -> dict[str, list[tuple[str, str | None, bool]]]:
    """name -> [(version, marker, has_hash)] from a lock file."""
    pins: dict[str, list] = {}
    lines = (ROOT / lock).read_text().splitlines()
    for number, line in enumerate(lines):
        match = PIN.match(line)
        if match:
            name, version, marker = match.groups()
            has_hash = number + 1 < len(lines) and "--hash=sha256:" in lines[number + 1]
            pins.setdefault(canonicalize_name(name), []).append((version, marker, has_hash))
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(r)
        for r in [*project["dependencies"], *extras["test"], *extras["lint"], *extras["vl"]]
    ]


def test_every_pin_has_a_hash():
    pins = locked_pins()
    assert len(pins) > 50
    unhashed = [name for name, entries in pins.items() if not all(h for _v, _m, h in entries)]
    assert not unhashed


def test_lock_satisfies_pyproject_here():
    pins = locked_pins()
    problems = []
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        here = [
            version
            for version, marker, _ in pins.get(canonicalize_name(req.name), [])
            if marker is None or Marker(marker).evaluate()
        ]
        if len(here) != 1 or not req.specifier.contains(here[0], prereleases=True):
            problems.append(f"{req} -> locked {here or 'nothing'}")
    assert not problems, "run scripts/lock.sh:\n" + "\n".join(problems)


def test_the_uv_that_installs_the_lock_is_the_one_that_made_it():
    """scripts/test.sh installs requirements.lock with the uv of requirements-uv.lock; lock.sh
    makes both with UV_VERSION."""
    made_by = re.search(r"^UV_VERSION=(\S+)$", (ROOT / "scripts/lock.sh").read_text(), re.M)
    pins = locked_pins("requirements-uv.lock")
    assert list(pins) == ["uv"]
    [(version, _marker, has_hash)] = pins["uv"]
    assert made_by and version == made_by[1] and has_hash
