import os

import pytest

from apem.data import storage
from apem.data.features import default_spec
from apem.research.synth import SynthConfig, generate


def test_join_and_is_gcs():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/tmp/x")
    assert storage.join("gs://b/", "a/", "/c.txt") == "gs://b/a/c.txt"
    assert storage.join("/tmp/a", "b") == os.path.join("/tmp/a", "b")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_bytes_roundtrip_list_exists(where, tmp_path, request):
    root = request.getfixturevalue("gcs_prefix") if where == "gcs" else str(tmp_path / "root")
    uri = storage.join(root, "dt=2026-01-01", "a.jsonl")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(storage.join(root, "dt=2026-01-02", "b.csv"), b"x")
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"
    assert storage.exists(uri) and storage.exists(storage.join(root, "dt=2026-01-01"))
    assert storage.list_files(root) == [uri, storage.join(root, "dt=2026-01-02", "b.csv")]
    assert storage.list_files(root, suffix=".jsonl") == [uri]
    with pytest.raises(storage.StorageError, match="a.missing"):
        storage.read_bytes(storage.join(root, "a.missing"))
    if where == "local":  # the atomic write leaves no temporary file behind
        assert os.listdir(os.path.dirname(uri)) == ["a.jsonl"]


def test_upload_download_copy_tree_with_success_marker(tmp_path, gcs_prefix):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"A")
    (src / "sub" / "b.txt").write_bytes(b"B")
    remote = storage.join(gcs_prefix, "dir")
    assert storage.upload_dir(str(src), remote) == remote
    assert storage.list_files(remote) == [
        f"{remote}/_SUCCESS", f"{remote}/a.txt", f"{remote}/sub/b.txt"]

    # gs:// -> gs:// and gs:// -> local keep the content and the marker discipline
    copy = storage.copy_tree(remote, storage.join(gcs_prefix, "copy"))
    assert storage.read_bytes(storage.join(copy, "sub/b.txt")) == b"B"
    local = storage.copy_tree(copy, str(tmp_path / "back"))
    assert (tmp_path / "back" / "a.txt").read_bytes() == b"A"
    assert (tmp_path / "back" / "sub" / "b.txt").read_bytes() == b"B"
    assert local == str(tmp_path / "back")

    # re-uploading replaces stale objects
    (src / "a.txt").unlink()
    storage.upload_dir(str(src), remote)
    assert not storage.exists(f"{remote}/a.txt")

    # a directory whose writer crashed before the marker is refused, naming the URI
    half = storage.join(gcs_prefix, "half")
    storage.write_bytes(storage.join(half, "part-0.parquet"), b"partial")
    with pytest.raises(storage.StorageError, match=r"half: incomplete directory"):
        storage.download_dir(half, str(tmp_path / "half"))
    with pytest.raises(storage.StorageError, match="no such directory"):
        storage.download_dir(storage.join(gcs_prefix, "nothing"), str(tmp_path / "n"))


def test_local_output_publishes_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with storage.local_output(str(target)) as out:
            open(os.path.join(out, "half.parquet"), "wb").close()
            raise RuntimeError("crash mid-write")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_dataset_roundtrip_through_gcs(gcs_prefix):
    table, _ = generate(SynthConfig(rows=500, days=3, seed=1))
    uri = storage.join(gcs_prefix, "dataset")
    storage.write_dataset_at(table, default_spec(), uri)
    assert storage.exists(storage.join(uri, "_SUCCESS"))
    ds = storage.read_dataset_at(uri)
    assert ds.path == uri and ds.spec == default_spec()
    assert ds.table.column("impression_id").to_pylist() == table.column("impression_id").to_pylist()
    for name in ("balance", "convert", "product_type"):
        assert ds.table.column(name).cast(table.schema.field(name).type).equals(table.column(name))
