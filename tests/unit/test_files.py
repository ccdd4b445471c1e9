import hashlib
import json

import pytest

from kiapi.runtime.errors import NotFound, PayloadTooLarge
from kiapi.runtime.files import FILE_ID_RE, FileStore, clean_content_type, clean_filename


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "files", max_upload_bytes=1000).open()


def visible_names(store):
    return sorted(p.name for p in store.root.iterdir())


def test_staged_bytes_are_invisible_until_commit(store):
    staged = store.stage()
    staged.write(b"hello ")
    staged.write(b"world")
    assert store.list() == []
    assert all(n.startswith(".tmp-") for n in visible_names(store))
    record = staged.commit("greeting.txt", "text/plain; charset=utf-8", {"k": 1})
    assert FILE_ID_RE.match(record.file_id)
    assert record.size == 11 and record.content_type == "text/plain"
    assert record.meta == {"sha256": hashlib.sha256(b"hello world").hexdigest(), "k": 1}
    assert store.path(record.file_id).read_bytes() == b"hello world"
    assert visible_names(store) == [f"{record.file_id}.bin", f"{record.file_id}.json"]


def test_size_cap_aborts_and_removes_temp(store):
    staged = store.stage()
    staged.write(b"x" * 1000)
    with pytest.raises(PayloadTooLarge) as err:
        staged.write(b"x")
    assert err.value.status == 413 and "KIAPI_MAX_UPLOAD_MB" in err.value.hint
    assert visible_names(store) == []


def test_records_survive_restart_and_list_newest_first(tmp_path):
    clock = iter([100.0, 200.0, 300.0])
    store = FileStore(tmp_path, max_upload_bytes=10, clock=lambda: next(clock)).open()
    ids = [
        store.put_bytes(b"%d" % i, filename=f"{i}.txt", content_type="text/plain").file_id
        for i in range(3)
    ]
    reopened = FileStore(tmp_path, max_upload_bytes=10).open()
    assert [r.file_id for r in reopened.list()] == ids[::-1]
    assert reopened.get(ids[1]).to_dict() == store.get(ids[1]).to_dict()
    assert reopened.path(ids[2]).read_bytes() == b"2"


def test_open_removes_crash_leftovers(tmp_path):
    store = FileStore(tmp_path, max_upload_bytes=100).open()
    kept = store.put_bytes(b"keep", filename="k", content_type="text/plain")
    (tmp_path / ".tmp-abc123").write_bytes(b"half an upload")
    (tmp_path / "file_00112233445566778899aabb.bin").write_bytes(
        b"bytes whose sidecar never landed"
    )
    (tmp_path / "file_ffeeddccbbaa998877665544.json").write_text("{not json")
    reopened = FileStore(tmp_path, max_upload_bytes=100).open()
    assert [r.file_id for r in reopened.list()] == [kept.file_id]
    names = sorted(p.name for p in tmp_path.iterdir())
    # Every leftover is gone, the sidecar without bytes too (a rename lost to a power cut).
    assert names == [f"{kept.file_id}.bin", f"{kept.file_id}.json"]


def test_delete_removes_record_and_bytes(store):
    record = store.put_bytes(b"abc", filename="a", content_type="application/octet-stream")
    store.delete(record.file_id)
    with pytest.raises(NotFound):
        store.get(record.file_id)
    with pytest.raises(NotFound):
        store.delete(record.file_id)
    assert visible_names(store) == []


def test_sidecar_holds_the_api_shape(store):
    record = store.put_bytes(b"x", filename="../../etc/passwd", content_type="not a type")
    sidecar = json.loads((store.root / f"{record.file_id}.json").read_text())
    assert sidecar == record.to_dict()
    assert sidecar["filename"] == "passwd" and sidecar["content_type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (None, "upload.bin"),
        ("", "upload.bin"),
        ("a/b\\c.png", "c.png"),
        ("bad\x00\nname", "badname"),
        ("x" * 300, "x" * 255),
        ("..", "upload.bin"),
    ],
)
def test_clean_filename(raw, clean):
    assert clean_filename(raw) == clean


def test_clean_content_type():
    assert clean_content_type("Image/PNG; q=1") == "image/png"
    assert clean_content_type("<script>") == "application/octet-stream"
    assert clean_content_type(None) == "application/octet-stream"
