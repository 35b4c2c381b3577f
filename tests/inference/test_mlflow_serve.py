"""Online serving as ``infra/base/serving.yaml`` runs it: the Deployment's own command and arguments
(``mlflow models serve --model-uri=models:/apem@champion --env-manager=local``), pointed at the
pushed champion of a temp sqlite registry on a loopback port. Rows POSTed to /invocations (``dataframe_split`` JSON) come back with the
probabilities ``apem predict`` writes for the same rows."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from apem.cli.main import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer {url} within {timeout}s")


SERVING_MANIFEST = os.path.join(os.path.dirname(__file__), "..", "..", "infra", "base", "serving.yaml")


def manifest_command(model_uri: str, port: int) -> list[str]:
    """The serving Deployment's command line, with this test's model, a loopback port, one worker."""
    import yaml

    with open(SERVING_MANIFEST) as fh:
        deployment = next(d for d in yaml.safe_load_all(fh) if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    here = {"--model-uri": model_uri, "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    args = [f"{name}={here.get(name, value)}" for name, _, value in (a.partition("=") for a in container["args"])]
    assert set(here) <= {a.partition("=")[0] for a in args}, args
    return container["command"] + args


@pytest.fixture(scope="module")
def server(tiny_champion, tmp_path_factory):
    """The MLflow scoring server in its own process group, ended with the whole group."""
    port = _free_port()
    venv_bin = os.path.dirname(sys.executable)  # mlflow starts uvicorn from PATH, as in the image
    command = manifest_command(tiny_champion["model_uri"], port)
    assert "--env-manager=local" in command
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen(
        [os.path.join(venv_bin, command[0]), *command[1:]],
        env={**os.environ, "MLFLOW_TRACKING_URI": tiny_champion["tracking_uri"],
             "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}/ping", proc)
        yield f"http://127.0.0.1:{port}"
    except RuntimeError:
        log.seek(0)
        raise RuntimeError(log.read()[-3000:]) from None
    finally:
        _end_group(proc)
        log.close()


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (uvicorn workers too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_served_champion_answers_like_apem_predict(server, tiny_champion, tmp_path):
    rows = tiny_champion["rows"]
    with urllib.request.urlopen(f"{server}/health", timeout=5) as resp:  # the liveness probe's path
        assert resp.status == 200
    status, answer = _post(f"{server}/invocations",
                           {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))})
    assert status == 200, answer
    served = answer["predictions"]
    assert len(served) == len(rows) and set(served[0]) == {"p_click", "p_authorize", "p_convert"}

    expected = str(tmp_path / "predicted.parquet")
    assert main(["predict", "--model", tiny_champion["model_uri"], "--mlflow-uri", tiny_champion["tracking_uri"],
                 "--data", tiny_champion["unlabelled"], "--out", expected]) == 0
    predicted = pq.read_table(expected)
    for column in ("p_click", "p_authorize", "p_convert"):
        np.testing.assert_allclose([row[column] for row in served], predicted.column(column).to_numpy(),
                                   rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_row_without_the_features_is_a_client_error(server):
    status, answer = _post(f"{server}/invocations", {"dataframe_split": {"columns": ["nothing"], "data": [[1]]}})
    assert 400 <= status < 500 and answer.get("error_code")
