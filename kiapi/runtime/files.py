"""Disk-backed file store: uploads and generated artifacts that outlive the process.

Layout under ``root``: ``<file_id>.bin`` holds the bytes, ``<file_id>.json`` the sidecar record
(filename, content_type, size, created_at, meta). Invariants:

* A record is visible if and only if its sidecar exists. Bytes are written to a temp file in the
  same directory, fsynced and renamed into place *before* the sidecar is written the same way;
  delete removes the sidecar first. A crash at any point therefore never exposes a partial file.
* Temp files are named ``.tmp-*``; :meth:`FileStore.open` removes them and any ``.bin`` without a
  sidecar (what a crash can leave behind).
* The in-memory index mirrors the sidecars on disk and is guarded by a lock; it is rebuilt from
  disk at start-up, so records survive restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kiapi.runtime.errors import NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

FILE_ID_RE = re.compile(r"^file_[0-9a-f]{16,64}$")
TMP_PREFIX = ".tmp-"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_CONTENT_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


def new_file_id() -> str:
    return "file_" + secrets.token_hex(12)


def clean_filename(name: str | None, fallback: str = "upload.bin") -> str:
    """A display filename: the last path component, no control characters, <= 255 chars."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().strip(".")
    return base[:255] or fallback


def clean_content_type(value: str | None) -> str:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    return media_type if _CONTENT_TYPE_RE.match(media_type) else DEFAULT_CONTENT_TYPE


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    filename: str
    content_type: str
    size: int
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "content_type": self.content_type,
            "size": self.size,
            "created_at": self.created_at,
            "meta": self.meta,
        }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(data, ensure_ascii=False).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StagedFile:
    """Bytes being written to the store; invisible until :meth:`commit`.

    Owned by one request at a time (not thread-safe). Exceeding ``max_bytes`` aborts the staging
    (the temp file is removed) and raises :class:`PayloadTooLarge`.
    """

    def __init__(self, store: FileStore, max_bytes: int) -> None:
        self._store = store
        self._max_bytes = max_bytes
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=store.root)
        self._tmp = Path(tmp)
        self._fh: IO[bytes] | None = os.fdopen(fd, "wb")
        self._sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._fh is None:
            raise RuntimeError("staged file is closed")
        self.size += len(chunk)
        if self.size > self._max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"file exceeds the upload limit of {self._max_bytes} bytes",
                hint="raise KIAPI_MAX_UPLOAD_MB to accept larger files",
            )
        self._fh.write(chunk)
        self._sha256.update(chunk)

    def commit(
        self, filename: str | None, content_type: str | None, meta: dict[str, Any] | None = None
    ) -> FileRecord:
        if self._fh is None:
            raise RuntimeError("staged file is closed")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        record = FileRecord(
            file_id=new_file_id(),
            filename=clean_filename(filename),
            content_type=clean_content_type(content_type),
            size=self.size,
            created_at=self._store.clock(),
            meta={"sha256": self._sha256.hexdigest(), **(meta or {})},
        )
        try:
            self._store._publish(self._tmp, record)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return record

    def abort(self) -> None:
        """Discard the staged bytes (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp.unlink(missing_ok=True)


class FileStore:
    def __init__(
        self, root: Path, *, max_upload_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.clock = clock
        self._index: dict[str, FileRecord] = {}
        self._lock = threading.Lock()

    def open(self) -> FileStore:
        """Create the directory, remove crash leftovers, and load the records from disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        removed = 0
        for path in self.root.iterdir():
            temp = path.name.startswith(TMP_PREFIX)
            partner = path.with_suffix(".json" if path.suffix == ".bin" else ".bin")
            orphan = path.suffix in (".bin", ".json") and not partner.exists()
            if temp or orphan:
                path.unlink(missing_ok=True)
                removed += 1
        index: dict[str, FileRecord] = {}
        for sidecar in self.root.glob("file_*.json"):
            try:
                data = json.loads(sidecar.read_bytes())
                record = FileRecord(**data)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable file record %s: %s", sidecar, exc)
                continue
            if FILE_ID_RE.match(record.file_id) and sidecar.with_suffix(".bin").exists():
                index[record.file_id] = record
        with self._lock:
            self._index = index
        if removed:
            log.info(
                "file store: removed %d leftover temp/orphan file(s) in %s", removed, self.root
            )
        return self

    # -- writing --------------------------------------------------------------------------
    def stage(self) -> StagedFile:
        return StagedFile(self, self.max_upload_bytes)

    def put_bytes(
        self, data: bytes, *, filename: str, content_type: str, meta: dict[str, Any] | None = None
    ) -> FileRecord:
        """Store a generated artifact atomically."""
        staged = StagedFile(self, max_bytes=max(len(data), 1))
        staged.write(data)
        return staged.commit(filename, content_type, meta)

    def _publish(self, tmp: Path, record: FileRecord) -> None:
        os.replace(tmp, self.root / f"{record.file_id}.bin")
        _fsync_dir(self.root)  # the bytes' name is durable before the sidecar can be
        _write_json_atomically(self.root / f"{record.file_id}.json", record.to_dict())
        _fsync_dir(self.root)
        with self._lock:
            self._index[record.file_id] = record

    # -- reading --------------------------------------------------------------------------
    def get(self, file_id: str) -> FileRecord:
        with self._lock:
            record = self._index.get(file_id)
        if record is None:
            raise NotFound(f"no file with id {file_id!r}")
        return record

    def path(self, file_id: str) -> Path:
        """On-disk location of a stored file's bytes. Raises NotFound."""
        self.get(file_id)
        return self.root / f"{file_id}.bin"

    def list(self) -> list[FileRecord]:
        """Every record, newest first."""
        with self._lock:
            records = list(self._index.values())
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    # -- deleting -------------------------------------------------------------------------
    def delete(self, file_id: str) -> None:
        with self._lock:
            record = self._index.pop(file_id, None)
        if record is None:
            raise NotFound(f"no file with id {file_id!r}")
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        (self.root / f"{file_id}.bin").unlink(missing_ok=True)
        _fsync_dir(self.root)
