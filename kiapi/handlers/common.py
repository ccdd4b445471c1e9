"""Handlers of ``specs/common.json``: health, metrics, the Files API and the Jobs API."""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from connexion import request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from kiapi.handlers import runtime
from kiapi.http.multipart import staged_form
from kiapi.runtime.errors import NotFound
from kiapi.runtime.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

DOWNLOAD_CHUNK = 256 * 1024


async def health_health_get():
    return runtime().health()


async def metrics_metrics_get():
    return Response(runtime().metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


# -- files ----------------------------------------------------------------------------------


async def list_files_v1_files_get():
    return {"object": "list", "data": [r.to_dict() for r in runtime().files.list()]}


async def upload_v1_files_post():
    form = staged_form(request.scope)
    try:
        upload = form.files["file"]
        record = await run_in_threadpool(
            upload.staged.commit, upload.filename, upload.content_type, {"source": "upload"}
        )
    finally:
        form.discard()  # anything not committed
    return record.to_dict()


async def get_file_v1_files__file_id__get(file_id: str):
    return runtime().files.get(file_id).to_dict()


async def delete_file_v1_files__file_id__delete(file_id: str):
    runtime().files.delete(file_id)
    return {"deleted": True, "file_id": file_id}


def _content_disposition(filename: str) -> str:
    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "'").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


async def download_file_v1_files__file_id__download_get(file_id: str):
    store = runtime().files
    record = store.get(file_id)
    try:  # open now: a delete after this point cannot break the response
        fh = open(store.path(file_id), "rb")  # noqa: SIM115 - closed by the iterator
    except FileNotFoundError:
        raise NotFound(f"no file with id {file_id!r}") from None

    return FileDownload(
        fh,
        headers={
            "Content-Type": _download_type(record.content_type),
            "Content-Length": str(os.fstat(fh.fileno()).st_size),
            "Content-Disposition": _content_disposition(record.filename),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        },
    )


# Types a browser would run or render as a page: served as opaque bytes, never as themselves.
ACTIVE_TYPES = re.compile(
    r"^\s*(text/html|application/xhtml|image/svg|text/xml|application/xml|[a-z]+/[a-z.+-]*xml"
    r"|text/javascript|application/javascript|application/ecmascript|text/ecmascript)",
    re.IGNORECASE,
)


def _download_type(content_type: str) -> str:
    """The uploader's content type, unless a browser would execute it."""
    return "application/octet-stream" if ACTIVE_TYPES.match(content_type) else content_type


class FileDownload(StreamingResponse):
    """Streams an open file and closes it when the response ends, also when the client leaves
    mid-download (a generator left suspended kept the descriptor, and a deleted file's disk
    space, until garbage collection)."""

    def __init__(self, fh, headers: dict[str, str]) -> None:
        self._fh = fh
        super().__init__(iter(lambda: fh.read(DOWNLOAD_CHUNK), b""), headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fh.close()


# -- jobs -----------------------------------------------------------------------------------


async def list_jobs_v1_jobs_get():
    return {"object": "list", "data": runtime().jobs.list()}


async def get_job_v1_jobs__job_id__get(job_id: str):
    return runtime().jobs.snapshot(job_id)


async def delete_job_v1_jobs__job_id__delete(job_id: str):
    return runtime().delete_job(job_id)
