"""End to end: two local runs of the whole daily_retrain pipeline with kfp.local.

The first run trains on the full window and becomes the champion. The second, a deliberately
worse model (one epoch, a learning rate too small to learn anything, a three-day window), is
evaluated against that champion on the same last day, is not promoted, and leaves the registry
and the serving location as they were.
"""

import json
import os

import pytest

from apem.release import mlflow_registry, reports
from apem.cli.main import main

FIRST_RUN = [
    "--rows", "60000", "--days", "6", "--seed", "0", "--model", "esmm",
    "--model-params", json.dumps({"embed_dim": 8, "tower_hidden": [16]}),
    "--negative-rate", "0.5", "--batch-size", "256",
    "--param", "beam_args=--direct_running_mode=in_memory --direct_num_workers=1",
    "--param", "bootstrap_resamples=100",
]


def registered_versions(uri):
    with mlflow_registry.tracking(uri) as client:
        return sorted(str(v.version) for v in client.search_model_versions("name='apem'"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_first_run_promotes_and_a_worse_second_run_does_not(tmp_path, capsys):
    workdir = str(tmp_path / "local")
    uri = mlflow_registry.sqlite_tracking_uri(os.path.join(workdir, "mlflow"))
    serving = os.path.join(workdir, "serving")
    output = os.path.join(workdir, "output")

    # Tiny data (68 convert positives on the test day): the first model's convert AUC is only
    # weakly above chance, so this run tests "beats chance" at alpha 0.25. The second run keeps the
    # default alpha 0.05, and its worse model is blocked by wide margins (p ~ 1e-10 on click).
    assert main(["pipeline", "run-local", "--workdir", workdir, "--epochs", "3", "--lr", "0.01", *FIRST_RUN,
                 "--param", "alpha=0.25"]) == 0
    note = capsys.readouterr().out
    assert "candidate BLESSED and promoted" in note, note
    first_dir = reports.read_latest(output)["report_dir"]  # reports/<date>/<run id>/, one folder per run
    assert os.path.dirname(first_dir) == os.path.join(output, "reports", "2026-01-06") and first_dir in note
    assert f"mlflow ui --backend-store-uri {uri}" in note
    assert "models:/apem@champion" in note and "statistics_html" in note
    with open(os.path.join(first_dir, "status.md")) as fh:  # what the cluster's exit handler writes
        assert fh.read().startswith("# OK: apem-daily-retrain SUCCEEDED")
    assert mlflow_registry.champion_version(uri, "apem") == "1"
    with open(os.path.join(first_dir, "evaluation.json")) as fh:
        first = json.load(fh)
    assert first["decision"]["blessed"] and not first["decision"]["has_champion"]
    with open(os.path.join(serving, "champion.json")) as fh:
        assert json.load(fh)["version"] == "1"
    serving_before = sorted(os.listdir(serving))
    # what a run killed during its split leaves in its own artifact folder, which no run writes again
    killed_split = os.path.join(workdir, "pipeline_root", "apem-daily-retrain-killed", "split")
    stale = os.path.join(killed_split, ".splits.999999999-abc.tmp")  # a pid no process has
    os.makedirs(os.path.join(stale, "train"))

    assert main(["pipeline", "run-local", "--workdir", workdir, "--epochs", "1", "--lr", "1e-6",
                 "--window-days", "3", *FIRST_RUN]) == 0
    note = capsys.readouterr().out
    assert "candidate NOT promoted" in note, note
    assert not os.path.exists(stale) and os.path.isdir(killed_split)
    second_dir = reports.read_latest(output)["report_dir"]
    assert second_dir != first_dir and os.path.dirname(second_dir) == os.path.dirname(first_dir)
    assert sorted(os.listdir(first_dir)) == ["evaluation.json", "push.json", "push.md", "status.md"]  # kept
    with open(os.path.join(second_dir, "evaluation.json")) as fh:
        second = json.load(fh)
    decision = second["decision"]
    assert decision["rule"]["alpha"] == 0.05 and first["decision"]["rule"]["alpha"] == 0.25
    assert decision["has_champion"] and decision["champion_version"] == "1" and not decision["blessed"]
    assert any("worse" in reason and "not worse" not in reason and "not significantly" not in reason
               for reason in decision["reasons"]), decision["reasons"]
    # both were scored on the same last day: the champion's test AUCs are the first run's own
    for label in first["labels"]:
        assert second["champion"]["tasks"][label]["auc"] == pytest.approx(first["candidate"]["tasks"][label]["auc"])
    assert second["rows"] == first["rows"]
    # nothing changed: same champion, no new version, same serving files
    assert mlflow_registry.champion_version(uri, "apem") == "1"
    assert registered_versions(uri) == ["1"]
    assert sorted(os.listdir(serving)) == serving_before
    with open(os.path.join(second_dir, "push.md")) as fh:
        assert "not promoted" in fh.read()

    # a failing run leaves the exit handler's alert: a run date with no logs fails ingest
    assert main(["pipeline", "run-local", "--workdir", workdir, "--run-date", "2030-01-01", "--window-days", "1",
                 *FIRST_RUN]) == 2
    failed_runs = os.listdir(os.path.join(output, "reports", "2030-01-01"))
    assert len(failed_runs) == 1 and failed_runs[0].startswith("local-")  # failed before push: its own id
    with open(os.path.join(output, "reports", "2030-01-01", failed_runs[0], "status.md")) as fh:
        status = fh.read()
    assert status.startswith("# ALERT: apem-daily-retrain FAILED") and "failed task: `ingest`" in status
