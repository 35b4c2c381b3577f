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


def test_installs_the_same_lock_with_the_cuda_build_of_the_same_torch(tmp_path):
    assert "$(BIN)/uv pip install" in read("Makefile") and "-r requirements.lock" in read("Makefile")
    assert "requirements.lock" in read("README.md")
    ops = instructions()
    assert ("COPY", "requirements.lock ./") in ops
    run = next(arg for op, arg in ops if op == "RUN" and "requirements.lock" in arg)
    rewrite = re.search(r'(sed -E "[^"]+" requirements\.lock)', run).group(1)
    assert "-r requirements.cuda.lock" in run and "download.pytorch.org/whl/${TORCH_CUDA}" in run
    # run the Dockerfile's own rewrite on the real lock: only the torch line changes, same version
    out = subprocess.run(["bash", "-c", rewrite], cwd=ROOT, env={"TORCH_CUDA": "cu128", "PATH": os.environ["PATH"]},
                         check=True, capture_output=True, text=True).stdout.splitlines()
    lock = read("requirements.lock").splitlines()
    changed = [(a, b) for a, b in zip(lock, out) if a != b]
    assert len(out) == len(lock) and len(changed) == 1
    cpu_line, cuda_line = changed[0]
    version = re.fullmatch(r"torch==([0-9.]+)\+cpu", cpu_line).group(1)
    assert cuda_line == f"torch=={version}+cu128"
    # the project is installed on top, without re-resolving dependencies
    assert any(op == "RUN" and "--no-deps ." in arg for op, arg in ops)


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
