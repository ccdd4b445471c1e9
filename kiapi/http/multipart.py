"""Streaming multipart uploads: bytes go straight to the file store, never into memory.

Connexion's stock multipart validator keeps every body message in a list and the parameter
decorator parses the form a second time, so a 300 MB upload costs 300 MB of RSS. This validator
replaces it for ``multipart/form-data`` operations: it parses the stream once with
python-multipart, writes file parts (schema ``format: binary``) into staged files of the file
store (size-capped while streaming, so chunked bodies are capped too), collects the small text
fields, and validates the result against the schema.

Hand-off: the parsed :class:`StagedForm` is put in ``scope["extensions"]["kiapi.form"]`` and the
downstream app sees an empty ``application/x-www-form-urlencoded`` body, so nothing after this
point parses the upload again. The handler owns the form from then on and must ``commit`` or
``discard`` it; staged bytes that are never committed stay invisible and are removed at the
latest when the store next opens.
"""

from __future__ import annotations

import copy
import typing as t
from dataclasses import dataclass, field

import python_multipart
from connexion.validators import AbstractRequestBodyValidator
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Receive, Scope

from kiapi.http.bounded_schema import BoundedValidator
from kiapi.runtime.errors import PayloadTooLarge, RequestInvalid
from kiapi.runtime.files import FileStore, StagedFile

FORM_SCOPE_KEY = "kiapi.form"
MAX_FIELD_BYTES = 64 * 1024  # a non-file form field
MAX_FIELDS = 32  # non-file form fields (and skipped file parts) in one form
MAX_FIELDS_BYTES = 256 * 1024  # all non-file form fields together
FORM_OVERHEAD_BYTES = 1024 * 1024  # headers, boundaries and text fields beside the files


@dataclass
class StagedUpload:
    staged: StagedFile
    filename: str | None
    content_type: str | None


@dataclass
class StagedForm:
    """A parsed multipart form: staged files by field name, and text fields."""

    files: dict[str, StagedUpload] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        for upload in self.files.values():
            upload.staged.abort()


def is_multipart(scope: Scope) -> bool:
    """The request says its body is ``multipart/form-data``."""
    media_type = Headers(scope=scope).get("content-type", "").split(";", 1)[0]
    return media_type.strip().lower() == "multipart/form-data"


def staged_form(scope: Scope) -> StagedForm:
    return scope.get("extensions", {})[FORM_SCOPE_KEY]


def _is_binary(schema: dict) -> bool:
    return schema.get("type") == "string" and schema.get("format") in ("binary", "byte")


def _invalid(msg: str, type_: str = "multipart_invalid", loc: list | None = None) -> RequestInvalid:
    return RequestInvalid([{"loc": loc or ["body"], "msg": msg, "type": type_}])


class _FormBuilder:
    """python-multipart callbacks that route each part to a staged file or a text buffer."""

    def __init__(self, store: FileStore, binary_fields: set[str]) -> None:
        self.store = store
        self.binary_fields = binary_fields
        self.form = StagedForm()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._sink: StagedFile | bytearray | None = None
        self._name = ""
        self._parts = 0  # parts that are not the operation's files
        self._field_bytes = 0
        self.complete = False  # set when the closing boundary has been parsed

    def callbacks(self) -> dict[str, t.Callable]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._sink = None

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise _invalid("multipart part without a form-data Content-Disposition name")
        self._name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        if self._name in self.binary_fields:
            if self._name in self.form.files:
                raise _invalid("expected a single file", "too_many_files", ["body", self._name])
            staged = self.store.stage()
            self.form.files[self._name] = StagedUpload(
                staged,
                filename.decode("utf-8", "replace") if filename is not None else None,
                self._headers.get("content-type", b"").decode("latin-1") or None,
            )
            self._sink = staged
        else:
            self._parts += 1
            if self._parts > MAX_FIELDS:
                raise PayloadTooLarge(
                    f"the form has more than {MAX_FIELDS} fields besides its file",
                    hint="send only the fields the operation documents",
                )
            # a file for a field the operation does not take: its bytes are skipped
            self._sink = None if filename is not None else bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if isinstance(self._sink, StagedFile):
            self._sink.write(data[start:end])
        elif isinstance(self._sink, bytearray):
            self._sink.extend(data[start:end])
            self._field_bytes += end - start
            if len(self._sink) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(
                    f"form field {self._name[:60]!r} exceeds {MAX_FIELD_BYTES} bytes"
                )
            if self._field_bytes > MAX_FIELDS_BYTES:
                raise PayloadTooLarge(
                    f"the form's text fields exceed {MAX_FIELDS_BYTES} bytes in all"
                )

    def _end(self) -> None:
        self.complete = True

    def _part_end(self) -> None:
        if isinstance(self._sink, bytearray):
            self.form.fields[self._name] = self._sink.decode("utf-8", "replace")
        self._sink = None


class StreamingMultipartValidator(AbstractRequestBodyValidator):
    async def wrap_receive(self, receive: Receive, *, scope: Scope):
        store: FileStore = scope["state"]["runtime"].files
        headers = Headers(scope=scope)
        limit = store.max_upload_bytes + FORM_OVERHEAD_BYTES
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the upload limit of "
                f"{store.max_upload_bytes} bytes",
                hint="raise KIAPI_MAX_UPLOAD_MB to accept larger files",
            )
        _, params = parse_options_header(headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            raise _invalid("multipart/form-data body without a boundary")

        properties = self._schema.get("properties", {})
        builder = _FormBuilder(store, {k for k, v in properties.items() if _is_binary(v)})
        parser = python_multipart.MultipartParser(boundary, builder.callbacks())
        received = 0
        try:
            more_body = True
            while more_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _invalid("client disconnected during the upload", "incomplete")
                chunk = message.get("body", b"")
                more_body = message.get("more_body", False)
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(
                        f"request body exceeds the upload limit of {store.max_upload_bytes} bytes",
                        hint="raise KIAPI_MAX_UPLOAD_MB to accept larger files",
                    )
                if chunk:
                    parser.write(chunk)
            parser.finalize()
            if not builder.complete:
                raise _invalid("multipart body ended before its closing boundary", "incomplete")
            self._validate_form(builder.form, properties)
        except MultipartParseError as exc:
            builder.form.discard()
            raise _invalid(f"malformed multipart body: {exc}") from None
        except BaseException:
            builder.form.discard()
            raise

        scope.setdefault("extensions", {})[FORM_SCOPE_KEY] = builder.form
        return _consumed_receive(receive), _as_consumed(scope)

    def _validate_form(self, form: StagedForm, properties: dict) -> None:
        errors = [
            {"loc": ["body", name], "msg": "Field required", "type": "missing"}
            for name in self._schema.get("required", [])
            if name not in form.files and name not in form.fields
        ]
        text_schema = copy.deepcopy(self._schema)
        text_schema["properties"] = {k: v for k, v in properties.items() if not _is_binary(v)}
        text_schema.pop("required", None)
        validator = BoundedValidator(text_schema, format_checker=BoundedValidator.FORMAT_CHECKER)
        for error in validator.iter_errors(form.fields):
            errors.append(
                {
                    "loc": ["body", *error.absolute_path],
                    "msg": error.message,
                    "type": str(error.validator),
                }
            )
        if errors:
            raise RequestInvalid(errors)


def _consumed_receive(receive: Receive) -> Receive:
    """A receive channel whose body is empty (it was consumed); later messages pass through."""
    sent = False

    async def receive_() -> t.MutableMapping[str, t.Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return receive_


def _as_consumed(scope: Scope) -> Scope:
    new_scope = dict(scope)
    new_scope["headers"] = list(scope["headers"])
    headers = MutableHeaders(scope=new_scope)
    headers["content-type"] = "application/x-www-form-urlencoded"
    headers["content-length"] = "0"
    if "transfer-encoding" in headers:
        del headers["transfer-encoding"]
    return new_scope
