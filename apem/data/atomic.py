"""Atomic local writes: the one helper behind every file and directory this project writes locally.

Readers see the old content or the new, never a partial one. Work happens in a hidden staging sibling
(``.<name>.<pid>-<random>.tmp``) that is renamed into place on success and removed on failure. The
writer's pid in the name lets the next run of the same output remove staging left by a killed
writer (:func:`remove_stale_staging`) without touching a live one's. Finished outputs get the
permissions of an ordinary write under the process umask, not mkstemp's private 0600/0700.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from typing import Iterator

STAGING_SUFFIX = ".tmp"
SUCCESS_MARKER = "_SUCCESS"  # written last into a finished dataset directory (local and gs://)


def _parent_of(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent


def _staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.{os.getpid()}-"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(path: str) -> list[str]:
    """Remove staging siblings of ``path`` whose writer process is gone; return what was removed."""
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{name}.") + r"(\d+)-[^/]*" + re.escape(STAGING_SUFFIX) + r"(\.old)?$")
    removed = []
    for candidate in glob.glob(os.path.join(glob.escape(parent), glob.escape(f".{name}.") + "*")):
        match = pattern.match(os.path.basename(candidate))
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if os.path.isdir(candidate) and not os.path.islink(candidate):
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(candidate)
            removed.append(candidate)
    return removed


_STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.\d+-[^/]*" + re.escape(STAGING_SUFFIX) + r"(\.old)?$")


def remove_stale_staging_under(root: str) -> list[str]:
    """:func:`remove_stale_staging` for every output under ``root`` that has staging beside it.

    For trees whose outputs are never written again, such as kfp.local's per-run artifact folders:
    a run killed mid-write leaves its staging in its own folder, which no later run revisits. Only
    staging whose writer process is gone is removed, so a live writer's is kept."""
    removed: list[str] = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            match = _STAGING_NAME.match(name)
            if match:
                removed += remove_stale_staging(os.path.join(folder, match.group("name")))
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in removed]
    return sorted(set(removed))


def _private_staging_dir(path: str) -> str:
    """A fresh staging directory beside ``path``, private to this user (mkdtemp's 0700)."""
    return tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=STAGING_SUFFIX, dir=_parent_of(path))


def make_staging_dir(path: str) -> str:
    """A fresh staging directory beside ``path``, with the permissions of an ordinary ``mkdir``."""
    tmp = _private_staging_dir(path)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a staging path to write one file to; on a clean exit it replaces ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=STAGING_SUFFIX, dir=_parent_of(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
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
    tmp = make_staging_dir(path)
    try:
        yield tmp
        replace_dir(tmp, os.path.abspath(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[str]:
    """Yield a private working folder in the system temp dir, removed on exit. It is named as staging of
    ``<tempdir>/<name>`` (the writer's pid inside), so that a use of the same name removes those that killed
    writers left (:func:`remove_stale_staging`), never a live writer's: a SIGKILL skips every ``finally``."""
    path = os.path.join(tempfile.gettempdir(), name)
    remove_stale_staging(path)
    tmp = _private_staging_dir(path)  # private, as a scratch in a shared temp dir should be
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
