"""Schedule creation against a tiny local KFP API server that records what the real kfp.Client sends."""

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apem.cli.main import main
from apem.dataplane.window import training_window
from apem_kfp.pipelines import configs
from apem_kfp.pipelines.kubeflow_runner import kfp_cron, recurring_run_arguments


class RecordingKFP(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for create_experiment + create_recurring_run."""

    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({})  # no experiment of that name yet
        self._reply({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            return self._reply({**body, "experiment_id": "exp-42"})
        if self.path == "/apis/v2beta1/recurringruns":
            return self._reply({**body, "recurring_run_id": "rr-7", "status": "ENABLED"})
        self._reply({})


@pytest.fixture
def kfp_host():
    RecordingKFP.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingKFP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_schedule_command_creates_a_daily_recurring_run(kfp_host, capsys):
    code = main(["pipeline", "schedule", "--host", kfp_host, "--cron", "0 30 2 * * *",
                 "--param", "epochs=7", "--param", "raw_uri=gs://bucket/raw"])
    assert code == 0
    assert "created recurring run rr-7" in capsys.readouterr().out
    posts = {path: body for method, path, body in RecordingKFP.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "apem"
    run = posts["/apis/v2beta1/recurringruns"]
    assert run["experiment_id"] == "exp-42" and run["display_name"] == "apem-daily-retrain"
    assert run["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"
    assert int(run["max_concurrency"]) == 1
    assert run["no_catchup"] is True and run["mode"] == "ENABLE"
    assert run["service_account"] == "apem-pipeline-runner"
    params = run["runtime_config"]["parameters"]
    assert params == {"epochs": 7, "raw_uri": "gs://bucket/raw", "run_date": ""}
    # the whole compiled pipeline travels in the request, with ingest fed the schedule time
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "apem-daily-retrain"
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    assert "exec-train" in platform["deploymentSpec"]["executors"]  # the GPU node placement goes too
    ingest = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["ingest"]["inputs"]["parameters"]["schedule_time"]
    assert ingest["runtimeValue"]["constant"] == "{{$.pipeline_job_schedule_time_utc}}"


def test_schedule_with_an_environment_takes_its_parameters_and_param_wins(kfp_host):
    assert sorted(configs.ENVIRONMENTS) == ["dev", "prod"]  # the choices of --env
    assert main(["pipeline", "schedule", "--host", kfp_host, "--env", "prod", "--param", "epochs=3"]) == 0
    run = {path: body for method, path, body in RecordingKFP.requests if method == "POST"}["/apis/v2beta1/recurringruns"]
    params = run["runtime_config"]["parameters"]
    assert params == {**configs.ENVIRONMENTS["prod"], "epochs": 3, "run_date": ""}
    assert params["beam_runner"] == "DataflowRunner"


def test_bad_schedule_input_is_a_clear_error(kfp_host, capsys):
    assert main(["pipeline", "schedule", "--host", kfp_host, "--cron", "every day"]) == 2
    assert "KFP needs 6 fields" in capsys.readouterr().err
    assert main(["pipeline", "schedule", "--host", kfp_host, "--param", "run_date=2026-01-01"]) == 2
    assert "leave run_date empty" in capsys.readouterr().err


def test_cron_and_arguments():
    assert kfp_cron("0 2 * * *") == "0 0 2 * * *"  # 5-field input gets seconds
    assert kfp_cron("0 0 2 * * *") == "0 0 2 * * *"
    args = recurring_run_arguments("p.yaml", "exp", params={"alpha": 0.01})
    assert args["max_concurrency"] == 1 and args["no_catchup"] is True
    assert args["params"] == {"alpha": 0.01, "run_date": ""} and args["cron_expression"] == "0 0 2 * * *"


def test_run_date_comes_from_the_schedule_time():
    assert training_window("", 7, "2026-03-10T02:00:00Z") == (dt.date(2026, 3, 3), dt.date(2026, 3, 9))
    # just after midnight UTC in the schedule's clock, late starts don't move the window
    assert training_window("", 1, "2026-03-10T00:00:01+00:00")[1] == dt.date(2026, 3, 9)
    assert training_window("", 1, "2026-03-10T01:30:00+02:00")[1] == dt.date(2026, 3, 8)  # 23:30 UTC on the 9th
    assert training_window("2026-01-31", 3, "2026-03-10T02:00:00Z") == (dt.date(2026, 1, 29), dt.date(2026, 1, 31))
    now = dt.datetime(2026, 5, 1, 12, tzinfo=dt.timezone.utc)
    assert training_window("", 2, "{{$.pipeline_job_schedule_time_utc}}", now=now)[1] == dt.date(2026, 4, 30)
    assert training_window("", 2, "", now=now)[1] == dt.date(2026, 4, 30)
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        training_window("03/10/2026", 2)
    with pytest.raises(ValueError, match="RFC 3339"):
        training_window("", 2, "yesterday")
    with pytest.raises(ValueError, match="window_days"):
        training_window("2026-01-01", 0)
