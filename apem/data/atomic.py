"""Atomic local writes: the one helper behind every file and directory this project writes locally.

Readers see the old content or the new, never a partial one. Work happens in a hidden staging sibling
(``.<name>.<random>.tmp``) that is renamed into place on success and removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

STAGING_SUFFIX = ".tmp"


def _parent_of(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent


def _staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}."


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a staging path to write one file to; on a clean exit it replaces ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=STAGING_SUFFIX, dir=_parent_of(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished local directory ``tmp`` to ``path``, replacing an older one."""
    if os.path.isdir(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """Yield a fresh staging directory; on a clean exit it replaces the directory ``path``."""
    tmp = tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=STAGING_SUFFIX, dir=_parent_of(path))
    try:
        yield tmp
        replace_dir(tmp, os.path.abspath(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
