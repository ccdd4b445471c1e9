"""Image inputs: every accepted spelling, and a clear 400 for everything else."""

import base64
import io
import os

import pytest
from PIL import Image

from kiapi.runtime.errors import BadRequest
from kiapi.runtime.files import FileStore
from kiapi.runtime.images import ImageLoader, ImagePolicy, base64_bytes
from tests.support import ImageServer, png_bytes


def png(size=(6, 4), color=(10, 200, 30)) -> bytes:
    return png_bytes(size, color)


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def files(tmp_path):
    store = FileStore(tmp_path / "files", max_upload_bytes=10**6)
    store.open()
    return store


def loader(files, **policy) -> ImageLoader:
    return ImageLoader(ImagePolicy(**policy), files)


def assert_bad(load, value, *fragments):
    with pytest.raises(BadRequest) as err:
        load(value)
    assert err.value.status == 400
    for fragment in fragments:
        assert fragment in err.value.detail, err.value.detail


def test_base64_spellings(files):
    data = png()
    std = base64.b64encode(data).decode()
    url_safe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(std[i : i + 20] for i in range(0, len(std), 20))
    for value in (std, url_safe, wrapped, f"data:image/png;base64,{std}"):
        image = loader(files).load(value)
        assert image.size == (6, 4) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (10, 200, 30)


def test_jpeg_base64_starting_with_a_slash_is_not_a_path(files):
    value = base64.b64encode(jpeg()).decode()
    assert value.startswith("/9j/")
    assert loader(files).load(value).size == (8, 8)


def test_file_id_reads_the_files_api(files):
    staged = files.stage()
    staged.write(png((3, 3)))
    record = staged.commit("a.png", "image/png", {})
    assert loader(files).load(record.file_id).size == (3, 3)
    assert_bad(loader(files).load, "file_0123456789abcdef", "file_0123456789abcdef", "Files API")


def test_local_paths_are_refused_unless_under_a_root(files, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "ok.png").write_bytes(png((5, 5)))
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside / "secret.png", root / "link.png")
    assert_bad(loader(files).load, str(root / "ok.png"), "KIAPI_LOCAL_INPUT_ROOTS")

    allowed = loader(files, local_roots=(root,))
    assert allowed.load(str(root / "ok.png")).size == (5, 5)
    for escape in (
        str(outside / "secret.png"),
        str(root / ".." / "outside" / "secret.png"),
        str(root / "link.png"),
    ):
        assert_bad(allowed.load, escape, "outside KIAPI_LOCAL_INPUT_ROOTS")
    assert_bad(allowed.load, str(root / "missing.png"), "no readable file")
    assert_bad(allowed.load, str(root), "not a regular file")


def test_hard_to_spot_escapes_stay_inside_the_roots(files, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True), outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    os.symlink(outside, root / "sub" / "dirlink")  # a directory symlink mid-path
    os.symlink(root / "sub" / "dirlink" / "secret.png", root / "chain.png")  # a chain
    os.mkfifo(root / "pipe.png")  # opening must not hang waiting for a writer
    allowed = loader(files, local_roots=(root,)).load
    for escape, fragment in (
        (str(root / "sub" / "dirlink" / "secret.png"), "outside KIAPI_LOCAL_INPUT_ROOTS"),
        (str(root / "chain.png"), "outside KIAPI_LOCAL_INPUT_ROOTS"),
        (f"{root}//sub/..//..//outside/./secret.png", "outside KIAPI_LOCAL_INPUT_ROOTS"),
        ("~/../../../../etc/hostname", "outside KIAPI_LOCAL_INPUT_ROOTS"),
        (f"{root}/ok.png\x00../../outside/secret.png", "NUL"),
        (str(root / "pipe.png"), "not a regular file"),
    ):
        assert_bad(allowed, escape, fragment)


def test_the_opened_file_is_checked_not_only_the_resolved_path(files, tmp_path):
    """What a symlink swapped in between the check and the open would lead to is refused:
    the location of the opened file itself must be under a root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    image_loader = loader(files, local_roots=(root,))
    with pytest.raises(BadRequest, match="outside KIAPI_LOCAL_INPUT_ROOTS"):
        image_loader._read_file(outside / "secret.png", "swapped", [root.resolve()])
    assert image_loader._read_file(outside / "secret.png", "unchecked") == png()


def test_garbage_is_a_400_with_the_reason(files):
    load = loader(files).load
    assert_bad(load, "hello world", "could not be decoded", "PNG, JPEG")  # valid base64 though
    assert_bad(load, "hello world!", "must be base64")
    assert_bad(load, base64.b64encode(b"not an image at all").decode(), "could not be decoded")
    assert_bad(load, "data:image/png;base64,@@@", "not valid base64")
    assert_bad(load, "data:image/png;base64", "malformed data URL")
    assert_bad(load, base64.b64encode(png()[:40]).decode(), "image")  # truncated PNG
    assert_bad(load, "relative/path.png", "must be base64")


def test_limits_on_bytes_and_pixels(files):
    data = png((300, 200))
    assert_bad(
        loader(files, max_bytes=100).load, base64.b64encode(data).decode(), "over the 100-byte"
    )
    assert_bad(
        loader(files, max_pixels=300 * 200 - 1).load,
        base64.b64encode(data).decode(),
        "300x200 pixels",
    )


@pytest.fixture(scope="module")
def image_server():
    pages = {
        "/cat.png": png((7, 7)),
        "/big.png": png((500, 500), (1, 2, 3)),
        "/redirect": ("redirect", "/cat.png"),
    }
    with ImageServer(pages) as server:
        yield server


def test_http_urls_are_fetched_with_a_cap(files, image_server):
    # The test server is on loopback, which only KIAPI_ALLOW_PRIVATE_URLS lets a URL reach.
    allowed = {"allow_private_urls": True}
    assert loader(files, **allowed).load(image_server.url("/cat.png")).size == (7, 7)
    assert loader(files, **allowed).load(image_server.url("/redirect")).size == (7, 7)
    assert_bad(loader(files, **allowed).load, image_server.url("/missing.png"), "HTTP 404")
    big = image_server.url("/big.png")
    assert_bad(loader(files, max_bytes=200, **allowed).load, big, "over 200")
    assert_bad(loader(files, **allowed).load, "http://127.0.0.1:9/x.png", "could not fetch")


def test_loopback_urls_are_refused_by_default(files, image_server):
    assert_bad(loader(files).load, image_server.url("/cat.png"), "loopback", "127.0.0.1")


def test_base64_decoder_rejects_non_base64():
    assert base64_bytes("aGVsbG8") == b"hello"
    for value in ("", "a", "héllo", "abc$", "/etc/passwd."):
        assert base64_bytes(value) is None


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with a few bytes of data:
    what a decompression bomb looks like before it is inflated."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_from_the_header(files):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # 300 MB of RGB: over KIAPI_MAX_IMAGE_PIXELS, under Pillow's own bomb threshold
    bomb = base64.b64encode(png_claiming(10_000, 10_000)).decode()
    assert_bad(loader(files).load, bomb, "10000x10000 pixels", "over the limit")
    # 30 GB of RGB: Pillow refuses it as it reads the header
    bomb = base64.b64encode(png_claiming(100_000, 100_000)).decode()
    assert_bad(loader(files).load, bomb, "pixels", "decompression bomb")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
