"""Build and load the project's C kernels (``apem/resources/kernels``) with the machine's C compiler.

The kernels are plain C over raw float pointers (no torch headers, so they build in about a
second), compiled together on first use with ``-march=native`` into one library in a per-user cache
and called through ctypes. They are built with ``-fopenmp``, and the ``libgomp.so.1`` they need is
the one torch's CPU build has already loaded (the dynamic loader reuses a loaded library of that
name), so a kernel splits its batch across torch's own OpenMP threads instead of competing with
them for the cores (``tests/nn/test_native_pool.py`` checks that one OpenMP runtime is loaded).

The cache key covers the sources, the flags, the compiler and the CPU's feature flags, so a home
directory shared by machines of different CPUs never loads a library built for another one. Only
the library's own file in the cache (named by that key) is ever written, through a temporary folder
and an atomic rename.

Where there is no compiler or the build fails, :func:`load_kernels` returns
None and callers keep their torch path; ``APEM_NATIVE_KERNELS=0`` asks for that path explicitly
(benchmarks and tests compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-g", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")
DISABLE_ENV = "APEM_NATIVE_KERNELS"
CACHE_ENV = "APEM_KERNEL_CACHE"


def native_kernels_enabled() -> bool:
    """False when ``APEM_NATIVE_KERNELS`` is 0/false/no/off (read at each call, so a test can flip it)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    """``$CC`` when set (and only it), else gcc or cc from PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("gcc") or shutil.which("cc")


def _cache_dirs() -> list[str]:
    if os.environ.get(CACHE_ENV):
        return [os.environ[CACHE_ENV]]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(base, "apem", "kernels"), os.path.join(tempfile.gettempdir(), f"apem-kernels-{os.getuid()}")]


def _build(compiler: str, sources: dict[str, bytes], defines: tuple[str, ...], target: str) -> None:
    """Compile ``sources`` (file name -> text) into ``target`` through a temporary folder beside it (atomic rename)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        for name, text in sources.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(text)
        lib = os.path.join(tmp, "kernels.so")
        c_files = sorted(os.path.join(tmp, name) for name in sources if name.endswith(".c"))
        subprocess.run([compiler, *CFLAGS, *(f"-D{d}" for d in defines), f"-I{tmp}", *c_files, "-o", lib],
                       check=True, capture_output=True, timeout=120)
        os.replace(lib, target)


def _sources() -> dict[str, bytes]:
    folder = resources.files("apem") / "resources" / "kernels"
    return {entry.name: entry.read_bytes() for entry in folder.iterdir() if entry.name.endswith((".c", ".h"))}


@functools.lru_cache(maxsize=None)
def _load(defines: tuple[str, ...]) -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler: APEM's CPU attention kernels are not built, the torch path runs instead")
        return None
    sources = _sources()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in [*(name.encode() + b"\0" + text for name, text in sorted(sources.items())), " ".join(CFLAGS).encode(),
                 " ".join(defines).encode(), version.split("\n")[0].encode(), _cpu_flags().encode()]:
        key.update(part + b"\0")
    for cache in _cache_dirs():
        target = os.path.join(cache, f"apem-kernels-{key.hexdigest()[:16]}.so")
        try:
            if not os.path.exists(target):
                _build(compiler, sources, defines, target)
            return ctypes.CDLL(target)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            logger.warning("APEM's CPU attention kernels did not build in %s, the torch path runs instead (%s %s)",
                           cache, error, detail.decode(errors="replace")[:500])
    return None


def load_kernels(defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled ``apem/resources/kernels`` as one library, or None (disabled, no compiler, or the build
    failed). ``defines`` are preprocessor names for the build (``APEM_GENERIC_KERNEL`` builds the portable
    loops without the AVX2 ones, which the tests compare)."""
    if not native_kernels_enabled():
        return None
    return _load(tuple(defines))
