"""One small storage layer for local paths and ``gs://`` URIs.

``gs://`` goes through google-cloud-storage, which honours ``STORAGE_EMULATOR_HOST`` (tests run a
real ``gcp-storage-emulator``). Writes are atomic:

- a single file: locally a temporary sibling then ``os.replace``; on GCS an object only becomes
  visible once its upload completes, so one upload is already all-or-nothing.
- a directory: locally a temporary sibling directory then one rename; on GCS every object is
  uploaded first and a ``_SUCCESS`` marker last. Readers of a ``gs://`` directory
  (:func:`download_dir`, :func:`local_input`) refuse a directory without the marker, so a crashed
  upload never looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from typing import Callable, Iterator

from apem.data.atomic import SUCCESS_MARKER, staged_dir, write_bytes_atomic

GCS_SCHEME = "gs://"


class StorageError(FileNotFoundError):
    """A missing or incomplete file or directory; the message names the URI."""


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def join(uri: str, *parts: str) -> str:
    if not is_gcs(uri):
        return os.path.join(uri, *parts)
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri}")
    bucket, _, name = uri[len(GCS_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: gs:// URI without a bucket name")
    return bucket, name.strip("/")


_CLIENTS: dict[tuple[int, str | None], object] = {}
# Every GCS call gets this policy (one place): connect within 5 s, a response within 120 s, retries
# of transient failures for at most 20 s overall, so an unreachable endpoint fails in well under 30 s.
GCS_TIMEOUT_S = (5.0, 120.0)
GCS_RETRY_DEADLINE_S = 20.0


def _policy() -> dict:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return {"timeout": GCS_TIMEOUT_S, "retry": DEFAULT_RETRY.with_timeout(GCS_RETRY_DEADLINE_S)}


def _gcs_failure(err: Exception) -> str:
    from google.api_core.exceptions import NotFound

    if type(err).__name__ == "DefaultCredentialsError":
        return "no Google Cloud credentials (run `gcloud auth application-default login` or set " \
               "GOOGLE_APPLICATION_CREDENTIALS)"
    if isinstance(err, NotFound):
        return f"not found ({_one_line(err)}); does the bucket exist?"
    return _one_line(err)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def names_gcs_uri(function: Callable) -> Callable:
    """Turn a Google Cloud failure (credentials, missing bucket, HTTP or retry error) inside
    ``function`` into a StorageError naming the gs:// URI it was given: one line, no traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as err:
            if type(err).__module__.split(".")[0] != "google" or isinstance(err, StorageError):
                raise
            uris = [a for a in args if isinstance(a, str) and is_gcs(a)]
            raise StorageError(f"{', '.join(uris) or 'gs://'}: {_gcs_failure(err)}") from None

    return wrapper


def client():
    """A google-cloud-storage client per process (clients are not fork-safe) and emulator host."""
    from google.cloud import storage as gcs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    key = (os.getpid(), emulator)
    if key not in _CLIENTS:
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            _CLIENTS[key] = gcs.Client(project="apem-local", credentials=AnonymousCredentials())
        else:
            _CLIENTS[key] = gcs.Client()
    return _CLIENTS[key]


def _bucket(uri: str):
    bucket, name = split_gcs(uri)
    return client().bucket(bucket), name


def _list_blobs(uri: str):
    bucket, prefix = _bucket(uri)
    return client().list_blobs(bucket, prefix=f"{prefix}/" if prefix else None, **_policy())


@names_gcs_uri
def exists(uri: str) -> bool:
    """True for an existing file, or a directory (local) / prefix with objects (gs://)."""
    if not is_gcs(uri):
        return os.path.exists(uri)
    bucket, name = _bucket(uri)
    if name and bucket.blob(name).exists(**_policy()):
        return True
    return any(True for _ in client().list_blobs(bucket, prefix=f"{name}/" if name else None, max_results=1,
                                                     **_policy()))


@names_gcs_uri
def list_files(uri: str, suffix: str = "") -> list[str]:
    """Every file below ``uri`` (recursively) whose name ends with ``suffix``, sorted, as full URIs."""
    if not is_gcs(uri):
        out = []
        for root, _, files in os.walk(uri):
            out.extend(os.path.join(root, f) for f in files if f.endswith(suffix))
        return sorted(out)
    bucket_name, _ = split_gcs(uri)
    return sorted(
        f"{GCS_SCHEME}{bucket_name}/{blob.name}"
        for blob in _list_blobs(uri)
        if blob.name.endswith(suffix) and not blob.name.endswith("/")
    )


@names_gcs_uri
def read_bytes(uri: str) -> bytes:
    if not is_gcs(uri):
        if not os.path.isfile(uri):
            raise StorageError(f"{uri}: no such file")
        with open(uri, "rb") as fh:
            return fh.read()
    from google.api_core.exceptions import NotFound

    bucket, name = _bucket(uri)
    try:
        return bucket.blob(name).download_as_bytes(**_policy())
    except NotFound:
        raise StorageError(f"{uri}: no such object") from None


@names_gcs_uri
def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new one, never a partial file."""
    if is_gcs(uri):
        bucket, name = _bucket(uri)
        bucket.blob(name).upload_from_string(data, **_policy())  # GCS objects appear only when complete
        return
    write_bytes_atomic(uri, data)


@names_gcs_uri
def delete_tree(uri: str) -> None:
    """Remove a directory (local) or every object under a prefix (gs://); the marker goes first."""
    if not is_gcs(uri):
        if os.path.isdir(uri):
            shutil.rmtree(uri)
        elif os.path.exists(uri):
            os.remove(uri)
        return
    bucket, name = _bucket(uri)
    marker = bucket.blob(f"{name}/{SUCCESS_MARKER}" if name else SUCCESS_MARKER)
    if marker.exists(**_policy()):
        marker.delete(**_policy())
    for blob in list(_list_blobs(uri)):
        blob.delete(**_policy())


@names_gcs_uri
def is_complete(uri: str) -> bool:
    """A local directory is complete once it exists (it was renamed into place); a gs:// one needs its marker."""
    if not is_gcs(uri):
        return os.path.isdir(uri)
    return exists(join(uri, SUCCESS_MARKER))


def _require_complete(uri: str) -> None:
    if not is_complete(uri):
        if is_gcs(uri) and exists(uri):
            raise StorageError(f"{uri}: incomplete directory (no {SUCCESS_MARKER} marker; the writer did not finish)")
        raise StorageError(f"{uri}: no such directory")


@names_gcs_uri
def download_dir(uri: str, local_dir: str) -> str:
    """Copy a complete directory to ``local_dir`` and return ``local_dir``.

    A local ``uri`` is copied too, so callers may modify what they get. Raises StorageError for a
    missing directory or a gs:// one without its ``_SUCCESS`` marker.
    """
    _require_complete(uri)
    if not is_gcs(uri):
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)
        return local_dir
    bucket_name, prefix = split_gcs(uri)
    os.makedirs(local_dir, exist_ok=True)
    for blob in _list_blobs(uri):
        rel = blob.name[len(prefix) + 1:] if prefix else blob.name
        if not rel or rel.endswith("/"):
            continue
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        blob.download_to_filename(target, **_policy())
    return local_dir


@names_gcs_uri
def upload_dir(local_dir: str, uri: str) -> str:
    """Publish ``local_dir`` at ``uri`` atomically, replacing what was there; return ``uri``.

    gs://: the old marker is removed first, then old objects, then every file is uploaded and the
    ``_SUCCESS`` marker written last. Local: copy into a temporary sibling, then one rename.
    """
    if not os.path.isdir(local_dir):
        raise StorageError(f"{local_dir}: no such directory to upload")
    if not is_gcs(uri):
        if os.path.abspath(local_dir) == os.path.abspath(uri):
            return uri
        with staged_dir(uri) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return uri
    delete_tree(uri)
    bucket, prefix = _bucket(uri)
    for root, _, files in os.walk(local_dir):
        for file in sorted(files):
            if file == SUCCESS_MARKER:
                continue
            path = os.path.join(root, file)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            bucket.blob(f"{prefix}/{rel}" if prefix else rel).upload_from_filename(path, **_policy())
    bucket.blob(f"{prefix}/{SUCCESS_MARKER}" if prefix else SUCCESS_MARKER).upload_from_string(b"", **_policy())
    return uri


@names_gcs_uri
def copy_tree(src_uri: str, dst_uri: str) -> str:
    """Copy a complete directory between any two of local / gs://, atomically; return ``dst_uri``."""
    _require_complete(src_uri)
    if is_gcs(src_uri) and is_gcs(dst_uri):
        src_bucket, src_prefix = _bucket(src_uri)
        delete_tree(dst_uri)
        dst_bucket, dst_prefix = _bucket(dst_uri)
        for blob in _list_blobs(src_uri):
            rel = blob.name[len(src_prefix) + 1:] if src_prefix else blob.name
            if rel == SUCCESS_MARKER or not rel:
                continue
            src_bucket.copy_blob(blob, dst_bucket, f"{dst_prefix}/{rel}" if dst_prefix else rel,
                                 **_policy())
        marker = f"{dst_prefix}/{SUCCESS_MARKER}" if dst_prefix else SUCCESS_MARKER
        dst_bucket.blob(marker).upload_from_string(b"", **_policy())
        return dst_uri
    with local_input(src_uri) as local:
        return upload_dir(local, dst_uri)


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[str]:
    """A local directory holding the complete directory ``uri``: ``uri`` itself when local,
    else a temporary download removed on exit."""
    if not is_gcs(uri):
        _require_complete(uri)
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="apem-in-") as tmp:
        yield download_dir(uri, os.path.join(tmp, "data"))


@contextlib.contextmanager
def local_output(uri: str) -> Iterator[str]:
    """A fresh local directory to write into; on a clean exit it is published at ``uri``
    atomically (rename locally, upload + marker on gs://). Nothing is published on error."""
    if is_gcs(uri):
        with tempfile.TemporaryDirectory(prefix="apem-out-") as tmp:
            out = os.path.join(tmp, "data")
            os.makedirs(out)
            yield out
            upload_dir(out, uri)
        return
    with staged_dir(uri) as tmp:
        yield tmp


def read_dataset_at(uri: str, **kwargs):
    """:func:`apem.data.spec.read_dataset` for a local path or a complete gs:// directory."""
    from apem.data.spec import read_dataset

    with local_input(uri) as local:
        ds = read_dataset(local, **kwargs)
        if is_gcs(uri):
            ds.path = uri  # the table is in memory (pyarrow reads without memory-mapping)
        return ds


def write_dataset_at(table, spec, uri: str) -> str:
    """:func:`apem.data.spec.write_dataset` to a local path or a gs:// URI (atomic either way)."""
    from apem.data.spec import write_dataset

    if not is_gcs(uri):
        return write_dataset(table, spec, uri)
    with local_output(uri) as out:
        write_dataset(table, spec, os.path.join(out, "dataset"))
        for name in os.listdir(os.path.join(out, "dataset")):
            os.replace(os.path.join(out, "dataset", name), os.path.join(out, name))
        os.rmdir(os.path.join(out, "dataset"))
    return uri
