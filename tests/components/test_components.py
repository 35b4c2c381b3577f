"""Each component's Python function, called with real KFP artifact objects on local paths, in
pipeline order on tiny synthetic logs (the same code kfp runs inside the container)."""

import json
import os
import shutil

import pyarrow as pa

import pytest
import torch
from kfp import dsl

from apem.data.features import default_spec
from apem.release import mlflow_registry, reports
from apem.research.synth import SynthConfig
from apem.research.synth_events import write_synthetic_events
from apem_kfp.components.evaluate import ROC_TASKS, evaluate
from apem_kfp.components.ingest import ingest
from apem_kfp.components.push import push
from apem_kfp.components.split import split
from apem_kfp.components.train import train
from apem_kfp.components.validate import validate

BEAM_ARGS = "--direct_running_mode=in_memory --direct_num_workers=1"
# the feature keys travel through model_params to the saved model (checked in test_split_and_train)
TINY_ESMM = json.dumps({"embed_dim": 4, "tower_hidden": [8], "numerical_encoding": "dense_log",
                        "embedding_l2_fields": {"user_id": 1e-3}, "data_loading": "streaming"})


def artifact(kind, root, name):
    return kind(name=name, uri=os.path.join(str(root), name), metadata={})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run ingest -> validate -> split -> train -> evaluate -> push once; keep every artifact."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("components")
    write_synthetic_events(SynthConfig(rows=6000, days=6, seed=3), str(root / "raw"))
    a = {name: artifact(kind, root, name) for name, kind in {
        "dataset": dsl.Dataset, "quarantine": dsl.Dataset, "ingest_metrics": dsl.Metrics,
        "statistics": dsl.Dataset, "validation_report": dsl.Markdown, "validate_metrics": dsl.Metrics,
        "statistics_html": dsl.HTML,
        "splits": dsl.Dataset, "split_metrics": dsl.Metrics, "model": dsl.Model, "train_metrics": dsl.Metrics,
        "evaluation": dsl.Artifact, "eval_report": dsl.Markdown, "eval_metrics": dsl.Metrics,
        "roc_click": dsl.ClassificationMetrics, "roc_authorize": dsl.ClassificationMetrics,
        "roc_convert": dsl.ClassificationMetrics,
        "push_report": dsl.Markdown, "push_metrics": dsl.Metrics,
    }.items()}
    tracking = mlflow_registry.sqlite_tracking_uri(str(root / "mlflow"))
    out = {"root": root, "a": a, "tracking": tracking}
    out["window_end"] = ingest.python_func(
        raw_uri=str(root / "raw"), run_date="2026-01-06", window_days=6, schedule_time="",
        attribution_window_days=3, dataset=a["dataset"], quarantine=a["quarantine"], metrics=a["ingest_metrics"])
    validate.python_func(dataset=a["dataset"], output_root=str(root / "output"), warn_only=False,
                         statistics=a["statistics"], report=a["validation_report"],
                         statistics_html=a["statistics_html"], metrics=a["validate_metrics"])
    split.python_func(dataset=a["dataset"], negative_rate=0.5, split_ratios="4,1,1", beam_runner="DirectRunner",
                      beam_args=BEAM_ARGS, splits=a["splits"], metrics=a["split_metrics"])
    train.python_func(splits=a["splits"], model_name="esmm", model_params=TINY_ESMM, epochs=1, batch_size=512,
                      lr=1e-2, seed=0, mlflow_tracking_uri=tracking, model=a["model"], metrics=a["train_metrics"])
    evaluate.python_func(splits=a["splits"], candidate=a["model"], mlflow_tracking_uri=tracking,
                         registered_model_name="apem-components", alpha=0.05, two_sided=False, primary_task="",
                         primary_tolerance=0.0, chance_margin=0.0, bootstrap_resamples=50,
                         evaluation=a["evaluation"], report=a["eval_report"], metrics=a["eval_metrics"],
                         roc_click=a["roc_click"], roc_authorize=a["roc_authorize"], roc_convert=a["roc_convert"])
    # force the decision both ways through the same push function: blessed first, then not blessed
    with open(a["evaluation"].path) as fh:
        out["evaluation"] = json.load(fh)
    return out


def run_push(chain, blessed, name):
    a, root = chain["a"], chain["root"]
    evaluation = artifact(dsl.Artifact, root, f"evaluation-{name}")
    result = dict(chain["evaluation"], decision=dict(chain["evaluation"]["decision"], blessed=blessed))
    with open(evaluation.path, "w") as fh:
        json.dump(result, fh)
    report, metrics = artifact(dsl.Markdown, root, f"push-report-{name}"), artifact(dsl.Metrics, root, f"pm-{name}")
    push.python_func(candidate=a["model"], evaluation=evaluation, splits=a["splits"],
                     mlflow_tracking_uri=chain["tracking"], registered_model_name="apem-components",
                     serving_uri=str(root / "serving"), output_root=str(root / "output"),
                     report_date=chain["window_end"], kfp_run_id="run-123", report=report, metrics=metrics)
    return report, metrics


def test_ingest_writes_dataset_quarantine_and_counts(chain):
    a = chain["a"]
    assert chain["window_end"] == "2026-01-06"
    assert a["dataset"].metadata["start"] == "2026-01-01" and a["dataset"].metadata["rows"] > 5000
    assert os.path.exists(os.path.join(a["dataset"].path, "spec.yaml"))
    assert os.path.isdir(a["quarantine"].path) and not os.path.exists(a["dataset"].path + "_quarantine")
    assert a["ingest_metrics"].metadata["quarantined"] == sum(a["quarantine"].metadata["counts"].values()) > 0


def test_ingest_on_beam_gives_the_same_dataset_and_counts(chain, tmp_path):
    a = chain["a"]
    out = {name: artifact(kind, tmp_path, name) for name, kind in {
        "dataset": dsl.Dataset, "quarantine": dsl.Dataset, "metrics": dsl.Metrics}.items()}
    end = ingest.python_func(raw_uri=str(chain["root"] / "raw"), run_date="2026-01-06", window_days=6,
                             schedule_time="", attribution_window_days=3, engine="beam", beam_runner="DirectRunner",
                             beam_args=BEAM_ARGS, **out)
    assert end == chain["window_end"] and out["dataset"].metadata == a["dataset"].metadata
    assert out["quarantine"].metadata["counts"] == a["quarantine"].metadata["counts"]
    assert os.path.isdir(out["quarantine"].path) and not os.path.exists(out["dataset"].path + "_quarantine")


def test_validate_passes_and_becomes_the_baseline(chain):
    a, root = chain["a"], chain["root"]
    assert a["validate_metrics"].metadata["anomalies"] == 0
    assert open(a["validation_report"].path).read().startswith("# Data validation")
    assert os.path.exists(os.path.join(root, "output", "validation", "baseline", "stats.pb"))


def test_validate_shows_tfdv_statistics_as_html(chain):
    html = open(chain["a"]["statistics_html"].path).read()
    assert "facets-iframe" in html and "facets-overview" in html  # TFDV's Facets Overview page


def test_an_anomalous_window_with_warn_only_never_becomes_the_baseline(chain, tmp_path):
    import pyarrow.parquet as pq

    root = chain["root"]
    baseline = os.path.join(root, "output", "validation", "baseline", "stats.pb")
    before = open(baseline, "rb").read()
    bad = tmp_path / "bad"
    shutil.copytree(chain["a"]["dataset"].path, bad)
    for name in sorted(os.listdir(bad)):
        if name.endswith(".parquet"):  # a credit score far outside the schema's domain
            table = pq.read_table(bad / name)
            column = table.schema.get_field_index("credit_score")
            pq.write_table(table.set_column(column, "credit_score", pa.array([5000.0] * table.num_rows)), bad / name)
    out = {name: artifact(kind, tmp_path, name) for name, kind in {
        "statistics": dsl.Dataset, "report": dsl.Markdown, "statistics_html": dsl.HTML, "metrics": dsl.Metrics}.items()}
    dataset = dsl.Dataset(name="bad", uri=str(bad), metadata={})
    # the statistics on Beam this time (the chain computed them in memory): same checks, same baseline rule
    validate.python_func(dataset=dataset, output_root=str(root / "output"), warn_only=True, engine="beam",
                         beam_runner="DirectRunner", beam_args=BEAM_ARGS, **out)
    assert out["metrics"].metadata["anomalies"] >= 1 and "credit_score" in open(out["report"].path).read()
    assert out["statistics"].metadata["became_baseline"] is False
    assert open(baseline, "rb").read() == before
    assert out["statistics"].metadata["baseline"]  # compared with the previous good window
    assert "facets-iframe" in open(out["statistics_html"].path).read()


def test_split_and_train(chain):
    a = chain["a"]
    for name in ("train", "val", "test"):
        assert os.path.exists(os.path.join(a["splits"].path, name, "spec.yaml"))
    with open(os.path.join(a["splits"].path, "split.json")) as fh:
        assert json.load(fh)["negative_rate"] == 0.5
    assert {k: v for k, v in a["model"].metadata.items() if k != "mlflow_run_id"} == {
        "model_name": "esmm", "negative_rate": 0.5, "epochs": 1, "numerical_encoding": "dense_log",
        "data_loading": "streaming"}  # the Beam split's shards stream
    assert len(a["model"].metadata["mlflow_run_id"]) == 32  # push registers the model into this run
    train_metrics = a["train_metrics"].metadata
    assert {"best_val_auc_click", "best_val_auc_authorize", "best_val_auc_convert"} <= set(train_metrics)
    assert not [k for k in train_metrics if k[-2:] in ("_0", "_1", "_2")]
    with mlflow_registry.tracking(chain["tracking"]) as client:  # MLflow's per-epoch metrics too
        runs = client.search_runs([client.get_experiment_by_name("apem").experiment_id])
        assert {"val_auc_click", "val_auc_convert"} <= set(runs[0].data.metrics)
    from apem.inference.model_dir import load_model

    loaded = load_model(a["model"].path)
    assert loaded.negative_rate == 0.5 and loaded.encoder.numerical_encoding == "dense_log"
    assert loaded.meta["train_config"]["embedding_l2_fields"] == {"user_id": 1e-3}
    assert loaded.meta["data_loading"] == "streaming"


def test_evaluate_outputs(chain):
    a, evaluation = chain["a"], chain["evaluation"]
    assert evaluation["champion_version"] is None  # nothing registered yet
    assert a["evaluation"].metadata["blessed"] == evaluation["decision"]["blessed"]
    report = open(a["eval_report"].path).read()
    assert report.startswith("# Evaluation: ") and "## Calibration after recalibration" in report
    assert "### convert" in report and "Funnel consistency rate" in report
    assert len(evaluation["calibration"]["convert"]) == 10
    assert 0 <= a["eval_metrics"].metadata["funnel_consistency_rate"] <= 1
    assert "click_auc" in a["eval_metrics"].metadata
    assert a["eval_metrics"].metadata["blessed"] == float(evaluation["decision"]["blessed"])
    assert ROC_TASKS == tuple(default_spec().labels)  # the documented list is this dataset's funnel
    for label in ROC_TASKS:
        roc = a[f"roc_{label}"]
        assert roc.metadata["task"] == label
        points = roc.metadata["confidenceMetrics"]
        assert points[0]["falsePositiveRate"] == 0 and points[-1]["recall"] == 1


def test_push_gate_both_ways(chain):
    root = chain["root"]
    report, metrics = run_push(chain, blessed=False, name="no")
    assert metrics.metadata == {"pushed": 0.0}
    assert "not promoted" in open(report.path).read()
    assert mlflow_registry.champion_version(chain["tracking"], "apem-components") is None
    assert not os.path.exists(os.path.join(root, "serving"))

    report, metrics = run_push(chain, blessed=True, name="yes")
    assert metrics.metadata == {"pushed": 1.0, "version": 1.0}
    assert mlflow_registry.champion_version(chain["tracking"], "apem-components") == "1"
    assert os.path.exists(os.path.join(root, "serving", "v1", "config.json"))
    # per run: reports/<date>/<run id>/, and latest.json names the newest run's folder
    kept = os.path.join(root, "output", "reports", chain["window_end"], "run-123")
    assert sorted(os.listdir(kept)) == ["evaluation.json", "push.json", "push.md"]
    with open(os.path.join(kept, "push.json")) as fh:
        assert json.load(fh)["pushed"] is True
    assert reports.read_latest(str(root / "output"))["report_dir"] == kept


def test_bad_model_params_is_a_clear_error(chain, tmp_path):
    a = chain["a"]
    with pytest.raises(ValueError, match="model_params"):
        train.python_func(splits=a["splits"], model_name="esmm", model_params="{embed_dim: 4}", epochs=1,
                          batch_size=512, lr=1e-2, seed=0, mlflow_tracking_uri="",
                          model=artifact(dsl.Model, tmp_path, "m"), metrics=artifact(dsl.Metrics, tmp_path, "x"))


def test_champion_is_registered_from_its_training_run_with_lineage(chain):
    run_push(chain, blessed=True, name="lineage")  # idempotent: the champion of test_push_gate_both_ways
    with mlflow_registry.tracking(chain["tracking"]) as client:
        version = client.get_model_version_by_alias("apem-components", "champion")
        assert version.run_id == chain["a"]["model"].metadata["mlflow_run_id"]
        run = client.get_run(version.run_id)
        assert run.data.params["model.name"] == "esmm" and "train.epochs" in run.data.params  # training params
        assert "val_auc_click" in run.data.metrics and "click_auc" in run.data.metrics  # train + evaluation
        artifacts = {f.path for f in client.list_artifacts(version.run_id, "evaluation")}
        assert artifacts == {"evaluation/report.md", "evaluation/evaluation.json"}
    tags = version.tags
    assert tags["apem.kfp_run_id"] == "run-123" and len(tags["apem.git_sha"]) >= 7
    split_record = json.loads(tags["apem.split"])
    assert split_record["negative_rate"] == 0.5 and tags["apem.data_window"] == "2026-01-01..2026-01-06"
    assert json.loads(tags["apem.verdict"])["blessed"] is True
    import mlflow

    info = mlflow.models.get_model_info(f"{version.source}")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert [c.name for c in info.signature.outputs.inputs] == ["p_click", "p_authorize", "p_convert"]
    assert "credit_score" in info.signature.inputs.input_names()


NO_APEM_SCRIPT = """
import importlib.util, sys
import mlflow, pandas as pd
assert importlib.util.find_spec("apem") is None, "apem is installed here"
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/apem-components@champion")
model.predict(pd.read_parquet(sys.argv[2])).to_parquet(sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_champion_loads_and_predicts_in_a_venv_without_apem(chain, tmp_path):
    """A virtualenv with only mlflow and the CPU torch wheel: the registered model brings its own code."""
    import subprocess
    import sys

    import mlflow
    import pandas as pd

    from apem.data.spec import read_dataset
    from apem.inference.model_dir import feature_frame, load_model

    run_push(chain, blessed=True, name="bare")
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    installer = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")] if os.path.exists(uv) \
        else [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    find_links = ["--find-links", "/opt/wheels"] if os.path.isdir("/opt/wheels") else []
    subprocess.run([*installer, *find_links, f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}"], check=True, timeout=600)

    test = read_dataset(os.path.join(chain["a"]["splits"].path, "test"))
    rows = feature_frame(test.table, test.spec.features, 50)
    rows.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "load.py").write_text(NO_APEM_SCRIPT)
    subprocess.run([str(venv / "bin" / "python"), str(tmp_path / "load.py"), chain["tracking"],
                    str(tmp_path / "rows.parquet"), str(tmp_path / "served.parquet")],
                   check=True, timeout=300, cwd=str(tmp_path), env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    served = pd.read_parquet(tmp_path / "served.parquet")
    expected = load_model(chain["a"]["model"].path).predict_frame(rows)
    pd.testing.assert_frame_equal(served, expected, rtol=1e-6)
