"""Image inputs: from what a client sends to a decoded RGB image.

An ``image`` field may be, checked in this order:

1. a data URL (``data:image/png;base64,...``);
2. an ``http://`` or ``https://`` URL, fetched with a byte cap and a time limit, from public
   addresses only unless ``KIAPI_ALLOW_PRIVATE_URLS`` is set (``kiapi.runtime.fetch``);
3. a Files API id (``file_...``), read from the file store;
4. base64 (standard or URL-safe alphabet, padding optional);
5. an absolute local path, accepted only under ``KIAPI_LOCAL_INPUT_ROOTS`` (none by default).

A string that is both valid base64 and an absolute path (``/9j/...`` is a JPEG's base64) is
base64 when it decodes to a recognisable image, a path otherwise. Every failure is a
:class:`BadRequest` (400) that says what was wrong. Reading is blocking I/O: callers run it off
the event loop. Decoding checks the pixel count from the header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from PIL import Image, UnidentifiedImageError

from kiapi.runtime.errors import BadRequest, NotFound
from kiapi.runtime.fetch import fetch_image_bytes, non_public
from kiapi.runtime.files import FILE_ID_RE, FileStore

# decode_image refuses more than KIAPI_MAX_IMAGE_PIXELS from the header; Pillow's own warning
# for sizes between its two bomb thresholds would only repeat that, once per such image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ImagePolicy:
    local_roots: tuple[Path, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 36_000_000
    fetch_timeout_s: float = 10.0
    allow_private_urls: bool = False


class ImageLoader:
    """Turns ``image`` field values into RGB images under one :class:`ImagePolicy`."""

    def __init__(self, policy: ImagePolicy, files: FileStore) -> None:
        self.policy = policy
        self.files = files

    def load(self, value: str) -> Image.Image:
        return decode_image(self.read_bytes(value), self.policy.max_pixels)

    def read_bytes(self, value: str) -> bytes:
        value = value.strip()
        if value[:5].lower() == "data:":
            return self._cap(data_url_bytes(value), "data URL")
        if re.match(r"^https?://", value, re.IGNORECASE):
            return self._fetch(value)
        if FILE_ID_RE.match(value):
            return self._file(value)
        decoded = base64_bytes(value)
        if decoded is not None and (not value.startswith("/") or looks_like_image(decoded)):
            return self._cap(decoded, "base64 image")
        if value.startswith(("/", "~")):
            return self._local(value)
        raise BadRequest(
            "image must be base64, a data URL, an http(s) URL, a file id from POST /v1/files, "
            "or an absolute local path"
        )

    def _cap(self, data: bytes, what: str) -> bytes:
        if len(data) > self.policy.max_bytes:
            raise BadRequest(
                f"{what} is {len(data)} bytes, over the {self.policy.max_bytes}-byte image limit"
            )
        return data

    def _fetch(self, url: str) -> bytes:
        return fetch_image_bytes(
            url,
            max_bytes=self.policy.max_bytes,
            timeout_s=self.policy.fetch_timeout_s,
            refuse=None if self.policy.allow_private_urls else non_public,
        )

    def _file(self, file_id: str) -> bytes:
        try:
            self.files.get(file_id)
            path = self.files.path(file_id)
            return self._read_file(path, f"file {file_id}")
        except (NotFound, FileNotFoundError):
            raise BadRequest(f"image refers to {file_id}, which is not in the Files API") from None

    def _local(self, value: str) -> bytes:
        """Read a local path only if its real location is under a root.

        The path is resolved (``..`` and every symlink followed) and checked against the
        resolved roots; the file is then opened without following a final symlink and the
        *opened* file's location is checked again, so swapping a component for a symlink
        between the check and the open cannot lead outside the roots.
        """
        roots = self._roots()
        if "\x00" in value:
            raise BadRequest("local image paths cannot contain NUL characters")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of no known user
            raise BadRequest(f"no readable file at {value}") from None
        if not path.is_absolute():
            raise BadRequest("local image paths must be absolute")
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise BadRequest(f"no readable file at {value}") from None
        if not under_any(resolved, roots):
            raise BadRequest(
                f"{value} is outside KIAPI_LOCAL_INPUT_ROOTS ({', '.join(map(str, roots))})"
            )
        return self._read_file(resolved, value, roots)

    def _roots(self) -> list[Path]:
        if not self.policy.local_roots:
            raise BadRequest(
                "local image paths are disabled: set KIAPI_LOCAL_INPUT_ROOTS to the folders "
                "kiapi may read images from (separated by ':'), or send the image as base64, "
                "a data URL, a URL or a file id"
            )
        return [root.resolve() for root in self.policy.local_roots]

    def _read_file(self, path: Path, what: str, roots: list[Path] | None = None) -> bytes:
        """Read a regular file, capped; ``roots``: the opened file must lie under one.

        O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a
        regular file); it changes nothing for regular files.
        """
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            raise BadRequest(f"no readable file at {what}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadRequest(f"{what} is not a regular file")
            opened = opened_path(fd)
            if roots is not None and opened is not None and not under_any(opened, roots):
                raise BadRequest(f"{what} is outside KIAPI_LOCAL_INPUT_ROOTS")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(self.policy.max_bytes + 1)
        finally:
            os.close(fd)
        return self._cap(data, what)


def under_any(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def opened_path(fd: int) -> Path | None:
    """Where an open file really is (Linux ``/proc``); None where that cannot be known."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def data_url_bytes(value: str) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma:
        raise BadRequest("malformed data URL: no ',' before the data")
    if header.lower().endswith(";base64"):
        decoded = base64_bytes(payload)
        if decoded is None:
            raise BadRequest("malformed data URL: the data is not valid base64")
        return decoded
    return unquote_to_bytes(payload)


def base64_bytes(value: str) -> bytes | None:
    """Decode standard or URL-safe base64 (whitespace and missing padding tolerated)."""
    compact = _WHITESPACE.sub("", value)
    if not compact or not _BASE64_RE.match(compact):
        return None
    compact = compact.replace("-", "+").replace("_", "/").rstrip("=")
    if len(compact) % 4 == 1:
        return None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def looks_like_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to RGB; refuses more than ``max_pixels`` before decoding any pixel."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise BadRequest(
                    f"image is {image.width}x{image.height} pixels, over the limit of "
                    f"{max_pixels} pixels"
                )
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise BadRequest(
            "image could not be decoded: its bytes are not in an image format kiapi reads "
            "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"image could not be decoded: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt image data
        raise BadRequest(f"image could not be decoded, its data is corrupt: {exc}") from None
