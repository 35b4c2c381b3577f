"""The project's metadata and locks: runtime dependencies declared, test-only packages kept out of
the production lock (and so out of the image)."""

import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ONLY = {"pytest", "pytest-timeout", "gcp-storage-emulator"}


def read(name):
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def requirements(name):
    """{canonical name: Requirement} of a requirements .in file (comments and -c/-r lines skipped)."""
    lines = [line.split("#")[0].strip() for line in read(name).splitlines()]
    parsed = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in parsed}


def locked_names(name):
    return {canonicalize_name(m) for m in re.findall(r"^([A-Za-z0-9_.-]+)==", read(name), re.M)}


def test_pyproject_declares_the_runtime_packages_of_requirements_in():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        declared = [Requirement(d) for d in tomllib.load(fh)["project"]["dependencies"]]
    declared = {canonicalize_name(r.name): r for r in declared}
    runtime = requirements("requirements.in")
    assert set(declared) == set(runtime), set(declared) ^ set(runtime)
    for name, wanted in runtime.items():  # same pins and extras: one list, written twice
        assert (declared[name].specifier, declared[name].extras) == (wanted.specifier, wanted.extras), name


def test_test_only_packages_live_in_the_dev_lock_only():
    assert not TEST_ONLY & set(requirements("requirements.in"))
    assert not TEST_ONLY & locked_names("requirements.lock")
    assert TEST_ONLY == set(requirements("requirements-dev.in"))
    assert TEST_ONLY <= locked_names("requirements-dev.lock")
    assert "-c requirements.lock" in read("requirements-dev.in").splitlines()  # one version of shared deps


def test_make_setup_installs_both_locks_and_make_lock_regenerates_both():
    makefile = read("Makefile")
    assert "-r requirements.lock -r requirements-dev.lock" in makefile
    lock_recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    for source, lock in (("requirements.in", "requirements.lock"), ("requirements-dev.in", "requirements-dev.lock")):
        assert re.search(rf"uv pip compile .*{re.escape(source)} .*--generate-hashes .*-o {re.escape(lock)}",
                         lock_recipe), (source, lock_recipe)
    for lock in ("requirements.lock", "requirements-dev.lock"):  # hashed, as the recipe says
        assert "--generate-hashes" in read(lock).splitlines()[1]
