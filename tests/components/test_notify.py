"""The exit handler's component: a status report, posted to a webhook served by this test on loopback."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from kfp import dsl

from apem_kfp.components.notify import notify


@pytest.fixture
def webhook():
    """A chat-style incoming webhook on 127.0.0.1 that records every JSON body it receives."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"content_type": self.headers["Content-Type"], "body": json.loads(body)})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):  # keep the test output clean
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/apem", received
    server.shutdown()
    server.server_close()


def failed(task="exit-handler-1", message="The DAG failed because some tasks failed. train: CUDA out of memory"):
    return dsl.PipelineTaskFinalStatus(
        state="FAILED", pipeline_job_resource_name="projects/p/locations/l/pipelineJobs/apem-daily-retrain-x1",
        pipeline_task_name=task, error_code=9, error_message=message)


def run_notify(tmp_path, status, webhook_url, run_date="2026-01-06"):
    report = dsl.Markdown(name="report", uri=os.path.join(str(tmp_path), "status.md"), metadata={})
    notify.python_func(status=status, run_date=run_date, window_days=6, schedule_time="", webhook_url=webhook_url,
                       report=report)
    with open(report.path) as fh:
        return fh.read(), report.metadata


def test_failure_is_reported_and_posted_as_slack_json(tmp_path, webhook):
    url, received = webhook
    text, metadata = run_notify(tmp_path, failed(), url)
    assert text.startswith("# ALERT: apem-daily-retrain FAILED")
    assert "apem-daily-retrain-x1" in text and "2026-01-01 .. 2026-01-06" in text
    assert "CUDA out of memory" in text and "failed task: `exit-handler-1`" in text
    assert metadata == {"state": "FAILED", "posted": True}
    assert received == [{"content_type": "application/json", "body": {"text": text}}]


def test_success_is_reported_without_an_error_section(tmp_path, webhook):
    url, received = webhook
    status = dsl.PipelineTaskFinalStatus(state="SUCCEEDED", pipeline_job_resource_name="run-7",
                                         pipeline_task_name="exit-handler-1", error_code=None, error_message="")
    text, _ = run_notify(tmp_path, status, url)
    assert text.startswith("# OK: apem-daily-retrain SUCCEEDED") and "## Error" not in text
    assert received[0]["body"]["text"] == text


def test_empty_webhook_is_skipped_and_an_unreachable_one_does_not_fail_the_task(tmp_path, webhook):
    _, received = webhook
    text, metadata = run_notify(tmp_path, failed(), "")
    assert metadata["posted"] is False and received == [] and "FAILED" in text
    _, metadata = run_notify(tmp_path, failed(), "http://127.0.0.1:9/closed-port")
    assert metadata["posted"] is False


def test_a_bad_run_date_still_produces_the_alert(tmp_path, webhook):
    url, received = webhook
    text, _ = run_notify(tmp_path, failed(message="ingest: run_date '2026-13-01' is not a YYYY-MM-DD date"), url,
                         run_date="2026-13-01")
    assert "data window: ? .. ?" in text and len(received) == 1
