"""Where this machine's ``kiapi serve`` processes listen, so ``kiapi models list`` asks the
right one without being told (a server started with ``--port 9000`` used to show
``RESIDENT ?``).

Each server writes ``<data folder>/servers/<pid>.json`` (its URL) once it is configured and
removes it at exit; a record whose process is gone is ignored and deleted by the next reader.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from pathlib import Path

import platformdirs


def records_dir() -> Path:
    return platformdirs.user_data_path("kiapi") / "servers"


def connect_url(host: str, port: int) -> str:
    """The URL a local client uses for a server bound to ``host``:``port``."""
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def record(host: str, port: int, folder: Path | None = None) -> Path | None:
    """Note this process's server address until it exits; None when the folder is not
    writable (a read-only home: the CLI then falls back to KIAPI_HOST/KIAPI_PORT)."""
    folder = folder or records_dir()
    path = folder / f"{os.getpid()}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps({"url": connect_url(host, port), "pid": os.getpid()}))
        os.replace(partial, path)
    except OSError:
        return None
    atexit.register(lambda: path.unlink(missing_ok=True))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_urls(folder: Path | None = None) -> list[str]:
    """URLs of live local servers, most recently started first."""
    folder = folder or records_dir()
    found = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            url, pid = str(data["url"]), int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(pid):
            found.append((path.stat().st_mtime, url))
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return [url for _, url in sorted(found, reverse=True)]
