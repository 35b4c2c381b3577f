"""What can be checked about the image without a Docker engine."""

import os
import re
import subprocess
import tomllib

import yaml

import apem_kfp.components

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def instructions():
    """(INSTRUCTION, argument) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_cuda_base_image():
    args = dict(arg.split("=", 1) for op, arg in instructions() if op == "ARG" and "=" in arg)
    base = next(arg for op, arg in instructions() if op == "FROM")
    assert base == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "cudnn" in args["CUDA_IMAGE"] and re.match(r"cu\d{3}$", args["TORCH_CUDA"])


def run_shell(command):
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env={"TORCH_CUDA": "cu128", "PATH": os.environ["PATH"]},
                          check=True, capture_output=True, text=True).stdout


def lock_packages(text):
    """{name: (version, [hashes])} of a hashed uv lock."""
    packages, name = {}, None
    for line in text.splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            name = match.group(1)
            packages[name] = (match.group(2), [])
        elif match := re.search(r"--hash=sha256:([0-9a-f]{64})", line):
            packages[name][1].append(match.group(1))
    return packages


def test_installs_the_production_lock_by_hash_and_the_cuda_torch_from_its_index_alone():
    assert "$(BIN)/uv pip install" in read("Makefile") and "-r requirements.lock" in read("Makefile")
    assert "requirements.lock" in read("README.md")
    ops = instructions()
    assert ("COPY", "requirements.lock ./") in ops
    run = next(arg for op, arg in ops if op == "RUN" and "requirements.lock" in arg)
    # no index mixing anywhere: the old --index-strategy unsafe-best-match + extra index are gone
    everything = " ".join(arg for _, arg in ops)
    assert "unsafe-best-match" not in everything and "--extra-index-url" not in everything
    assert "requirements-dev" not in everything  # test-only packages never enter the image
    # step 1: the Dockerfile's own filter on the real lock drops exactly torch, hashes kept, required
    drop_torch = re.search(r"(awk '[^']+' requirements\.lock)", run).group(1)
    lock, filtered = lock_packages(read("requirements.lock")), lock_packages(run_shell(drop_torch))
    assert set(lock) - set(filtered) == {"torch"} and all(filtered[n] == lock[n] for n in filtered)
    assert all(hashes for _, hashes in lock.values())  # every locked package is pinned by hash
    assert "--require-hashes -r requirements.notorch.lock" in run
    # step 2: the CUDA build of the locked torch version, from the PyTorch index alone, the rest held
    installs = [part for part in run.split("&&") if "uv pip install" in part]
    torch_step = next(part for part in installs if "torch==" in part)
    assert "--index-url https://download.pytorch.org/whl/${TORCH_CUDA}" in torch_step
    assert "-c requirements.notorch.lock" in torch_step and '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in torch_step
    version_cmd = re.search(r'TORCH_VERSION="\$\((sed .+? requirements\.lock)\)"', run).group(1)
    assert run_shell(version_cmd).strip() + "+cpu" == lock["torch"][0]
    # the project is installed on top, without re-resolving dependencies
    assert any(op == "RUN" and "--no-deps ." in arg for op, arg in ops)


def test_has_the_c_compiler_the_cpu_kernels_are_built_with():
    """Serving, evaluate and batch scoring run on CPU in this image: without a compiler APEM's kernels fall back to
    torch (apem/nn/native.py). gcc alone (--no-install-recommends) lacks the C library's headers."""
    install = next(arg for op, arg in instructions() if op == "RUN" and "apt-get install" in arg)
    packages = install.split("apt-get install", 1)[1].split("&&", 1)[0].split()
    assert {"gcc", "libc6-dev"} <= set(packages), packages
    assert ("ENV", "HOME=/home/apem") in [(op, arg.split()[0]) for op, arg in instructions() if op == "ENV"]


def test_runs_as_non_root_and_bakes_no_credentials():
    ops = instructions()
    users = [arg for op, arg in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ops.index(next(o for o in ops if o[0] == "USER")) > max(
        i for i, (op, arg) in enumerate(ops) if op == "RUN")  # nothing runs as root after the switch
    env_and_args = " ".join(arg for op, arg in ops if op in ("ENV", "ARG")).upper()
    for word in ("SECRET", "TOKEN", "PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_", "API_KEY"):
        assert word not in env_and_args
    copied = " ".join(arg for op, arg in ops if op in ("COPY", "ADD"))
    assert not re.search(r"\.json|\.pem|\.key|\.env|credentials", copied)
    ignored = read(".dockerignore").splitlines()
    for pattern in (".env", "*.pem", "*.key", "**/*credentials*.json", ".venv", "runs", ".git"):
        assert pattern in ignored


def test_components_run_in_the_image_built_from_it():
    label = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', read("Dockerfile")).group(1)
    assert label == apem_kfp.components.APEM_IMAGE
    assert f"docker build -t {apem_kfp.components.APEM_IMAGE} ." in read("Dockerfile")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        assert apem_kfp.components.IMAGE_TAG == tomllib.load(fh)["project"]["version"]
    for name in apem_kfp.components.COMPONENT_NAMES:  # the committed component YAMLs name it too
        with open(os.path.join(ROOT, "components", f"{name}.yaml")) as fh:
            spec = yaml.safe_load(fh)
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {apem_kfp.components.APEM_IMAGE}, name
