"""Concurrent ``apem pipeline run-local`` on one workdir: serialised by a lock file, and a refused
push is reported as refused (summary and exit code), never as "promoted"."""

import json
import os
import subprocess
import sys
import time

from apem.release import mlflow_registry
from apem.release.push import push, render_report
from apem_kfp.pipelines import local_runner

HOLD_LOCK = """
import sys, time
from apem_kfp.pipelines.local_runner import workdir_lock
with workdir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def apem_cli():
    return os.path.join(os.path.dirname(sys.executable), "apem")


def test_a_second_run_on_a_busy_workdir_is_refused_at_once_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "local")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        second = subprocess.run([apem_cli(), "pipeline", "run-local", "--workdir", workdir, "--rows", "1000"],
                                capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "in use by another run-local" in lines[0], lines
    assert "Traceback" not in second.stderr and took < 60  # refused at once, before any work (imports only)
    assert sorted(os.listdir(workdir)) == [local_runner.LOCK_FILE]  # nothing generated, nothing touched
    # the kernel released the killed holder's lock: the next run takes it without any cleanup
    with local_runner.workdir_lock(workdir) as path:
        with open(path) as fh:
            assert fh.read().strip() == str(os.getpid())


def test_a_refused_push_is_reported_as_refused_with_exit_code_3(tmp_path):
    """A real push refusal (the evaluation compared with champion 1, the store's champion is none:
    it moved) read back through the run's reports, as run-local reads them."""
    output, model_dir = tmp_path / "output", tmp_path / "candidate"
    model_dir.mkdir()
    uri = mlflow_registry.sqlite_tracking_uri(str(tmp_path / "mlflow"))
    decision = {"blessed": True, "champion_version": "1", "reasons": ["no worse than the champion"]}
    outcome = push(str(model_dir), decision, uri, "apem")
    assert not outcome["pushed"]
    report_dir = tmp_path / "output" / "reports" / "2026-01-06" / "run-1"
    report_dir.mkdir(parents=True)
    (report_dir / "push.json").write_text(json.dumps(outcome))
    (report_dir / "push.md").write_text(render_report(outcome))
    (report_dir / "evaluation.json").write_text(json.dumps({"decision": decision}))
    config = local_runner.LocalRunConfig(workdir=str(tmp_path))
    arguments = {"mlflow_tracking_uri": uri, "output_root": str(output)}
    result = local_runner.run_summary(config, arguments, str(report_dir), {"total": 1, "generate": 0, "pipeline": 1})
    note = local_runner.closing_note(result)
    assert "push was REFUSED: NOT promoted" in note and "BLESSED and promoted" not in note, note
    assert "champion moved from 1 to None" in note
    assert local_runner.exit_code(result) == local_runner.EXIT_PUSH_REFUSED == 3
    # the gate keeping the champion is a normal outcome, and a promotion is one
    assert local_runner.exit_code(dict(result, blessed=False)) == 0
    assert local_runner.exit_code(dict(result, pushed=True)) == 0
