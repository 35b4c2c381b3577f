"""Shared fixtures.

``gcs_bucket`` (session): a real ``gcp-storage-emulator`` server, started as a subprocess on a free
localhost port with in-memory storage and one bucket, with ``STORAGE_EMULATOR_HOST`` set in this
process's environment (child processes inherit it). Returns the bucket URI, ``"gs://apem-test"``.
Torn down (process terminated, variable restored) at the end of the session.

``gcs_prefix`` (function): a fresh ``gs://apem-test/<test-name>-<n>`` prefix, so tests sharing
the session's bucket never see each other's objects. Use it for gs:// tests:

    def test_roundtrip(gcs_prefix):
        storage.write_bytes(storage.join(gcs_prefix, "a.txt"), b"x")
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

GCS_TEST_BUCKET = "apem-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not answer at {url} within {timeout}s")


@pytest.fixture(scope="session")
def gcs_bucket():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "localhost", "--port", str(port),
         "--in-memory", "--default-bucket", GCS_TEST_BUCKET, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://localhost:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_healthy(f"{host}/", proc)
        os.environ["STORAGE_EMULATOR_HOST"] = host
        yield f"gs://{GCS_TEST_BUCKET}"
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_PREFIX_COUNTER = itertools.count()


@pytest.fixture
def gcs_prefix(gcs_bucket, request):
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"{gcs_bucket}/{name}-{next(_PREFIX_COUNTER)}"


CHAMPION_NAME = "apem-tiny"


@pytest.fixture(scope="session")
def tiny_champion(tmp_path_factory):
    """A tiny ESMM trained on 1,500 synthetic rows with negative rate 0.5 and pushed, as the pipeline
    does (``apem.release.push``: registered with an input example, alias ``champion``), into a temp
    sqlite MLflow store. Also an unlabelled copy of 300 rows to score. Returns a dict: ``tracking_uri``,
    ``name``, ``model_uri`` (``models:/apem-tiny@champion``), ``model_dir``, ``unlabelled`` (dataset
    directory), ``rows`` (the same rows as the plain pandas frame a client sends)."""
    import pyarrow.parquet as pq
    import torch

    from apem.data.features import default_spec
    from apem.data.spec import write_dataset
    from apem.inference.model_dir import feature_frame
    from apem.release import mlflow_registry
    from apem.release.push import push
    from apem.research.synth import SynthConfig, generate
    from apem.train.from_dirs import train_from_dirs
    from apem.train.trainer import TrainConfig

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("champion")
    table = generate(SynthConfig(rows=1_800, days=3, seed=11))[0]
    spec = default_spec()
    write_dataset(table.slice(0, 1_500), spec, str(root / "train"))
    model_dir = str(root / "model")
    train_from_dirs(str(root / "train"), str(root / "train"), model_dir, model_name="esmm",
                    model_overrides={"embed_dim": 4, "tower_hidden": [8]},
                    config=TrainConfig(epochs=1, batch_size=512, progress=False), negative_rate=0.5)
    scored = table.slice(1_500)
    (root / "unlabelled").mkdir()
    pq.write_table(scored.drop(list(spec.labels)), root / "unlabelled" / "part-00000.parquet")
    spec.write(str(root / "unlabelled"))
    rows = feature_frame(scored, spec.features)
    tracking_uri = mlflow_registry.sqlite_tracking_uri(str(root / "mlflow"))
    outcome = push(model_dir, {"blessed": True, "reasons": []}, tracking_uri, CHAMPION_NAME,
                   registration={"input_example": rows.head(5)})
    assert outcome["pushed"], outcome
    return {"tracking_uri": tracking_uri, "name": CHAMPION_NAME, "model_uri": f"models:/{CHAMPION_NAME}@champion",
            "model_dir": model_dir, "unlabelled": str(root / "unlabelled"), "rows": rows, "root": root}


def _write_shards(table, spec, path, files: int, row_group_rows: int) -> str:
    import pyarrow.parquet as pq

    from apem.data.atomic import SUCCESS_MARKER

    os.makedirs(path, exist_ok=True)
    per_file = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * per_file, per_file), os.path.join(path, f"part-{i:05d}.parquet"),
                       row_group_size=row_group_rows)
    spec.write(str(path))
    open(os.path.join(path, SUCCESS_MARKER), "wb").close()
    return str(path)


@pytest.fixture(scope="session")
def write_shards():
    """``write_shards(table, spec, path, files, row_group_rows)``: a dataset directory of ``files``
    Parquet files with several row groups each (as the Beam split writes them); returns the path."""
    return _write_shards
