"""Each component's Python function, called with real KFP artifact objects on local paths, in
pipeline order on tiny synthetic logs (the same code kfp runs inside the container)."""

import json
import os

import pytest
import torch
from kfp import dsl

from apem.release import mlflow_registry
from apem.research.synth import SynthConfig
from apem.research.synth_events import write_synthetic_events
from apem_kfp.components.evaluate import evaluate
from apem_kfp.components.ingest import ingest
from apem_kfp.components.push import push
from apem_kfp.components.split import split
from apem_kfp.components.train import train
from apem_kfp.components.validate import validate

BEAM_ARGS = "--direct_running_mode=in_memory --direct_num_workers=1"
# the feature keys travel through model_params to the saved model (checked in test_split_and_train)
TINY_ESMM = json.dumps({"embed_dim": 4, "tower_hidden": [8], "numerical_encoding": "dense_log",
                        "embedding_l2_fields": {"user_id": 1e-3}})


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
        "splits": dsl.Dataset, "split_metrics": dsl.Metrics, "model": dsl.Model, "train_metrics": dsl.Metrics,
        "evaluation": dsl.Artifact, "eval_report": dsl.Markdown, "eval_metrics": dsl.Metrics,
        "roc1": dsl.ClassificationMetrics, "roc2": dsl.ClassificationMetrics, "roc3": dsl.ClassificationMetrics,
        "push_report": dsl.Markdown, "push_metrics": dsl.Metrics,
    }.items()}
    tracking = mlflow_registry.sqlite_tracking_uri(str(root / "mlflow"))
    out = {"root": root, "a": a, "tracking": tracking}
    out["window_end"] = ingest.python_func(
        raw_uri=str(root / "raw"), run_date="2026-01-06", window_days=6, schedule_time="",
        attribution_window_days=3, dataset=a["dataset"], quarantine=a["quarantine"], metrics=a["ingest_metrics"])
    validate.python_func(dataset=a["dataset"], output_root=str(root / "output"), warn_only=False,
                         statistics=a["statistics"], report=a["validation_report"], metrics=a["validate_metrics"])
    split.python_func(dataset=a["dataset"], negative_rate=0.5, split_ratios="4,1,1", beam_runner="DirectRunner",
                      beam_args=BEAM_ARGS, splits=a["splits"], metrics=a["split_metrics"])
    train.python_func(splits=a["splits"], model_name="esmm", model_params=TINY_ESMM, epochs=1, batch_size=512,
                      lr=1e-2, seed=0, mlflow_tracking_uri=tracking, model=a["model"], metrics=a["train_metrics"])
    evaluate.python_func(splits=a["splits"], candidate=a["model"], mlflow_tracking_uri=tracking,
                         registered_model_name="apem-components", alpha=0.05, two_sided=False, primary_task="",
                         primary_tolerance=0.0, chance_margin=0.0, bootstrap_resamples=50,
                         evaluation=a["evaluation"], report=a["eval_report"], metrics=a["eval_metrics"],
                         roc_step1=a["roc1"], roc_step2=a["roc2"], roc_step3=a["roc3"])
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
    push.python_func(candidate=a["model"], evaluation=evaluation, mlflow_tracking_uri=chain["tracking"],
                     registered_model_name="apem-components", serving_uri=str(root / "serving"),
                     output_root=str(root / "output"), report_date=chain["window_end"], report=report, metrics=metrics)
    return report, metrics


def test_ingest_writes_dataset_quarantine_and_counts(chain):
    a = chain["a"]
    assert chain["window_end"] == "2026-01-06"
    assert a["dataset"].metadata["start"] == "2026-01-01" and a["dataset"].metadata["rows"] > 5000
    assert os.path.exists(os.path.join(a["dataset"].path, "spec.yaml"))
    assert os.path.isdir(a["quarantine"].path) and not os.path.exists(a["dataset"].path + "_quarantine")
    assert a["ingest_metrics"].metadata["quarantined"] == sum(a["quarantine"].metadata["counts"].values()) > 0


def test_validate_passes_and_becomes_the_baseline(chain):
    a, root = chain["a"], chain["root"]
    assert a["validate_metrics"].metadata["anomalies"] == 0
    assert open(a["validation_report"].path).read().startswith("# Data validation")
    assert os.path.exists(os.path.join(root, "output", "validation", "baseline", "stats.pb"))


def test_split_and_train(chain):
    a = chain["a"]
    for name in ("train", "val", "test"):
        assert os.path.exists(os.path.join(a["splits"].path, name, "spec.yaml"))
    with open(os.path.join(a["splits"].path, "split.json")) as fh:
        assert json.load(fh)["negative_rate"] == 0.5
    assert a["model"].metadata == {"model_name": "esmm", "negative_rate": 0.5, "epochs": 1,
                                   "numerical_encoding": "dense_log"}
    from apem.inference.model_dir import load_model

    loaded = load_model(a["model"].path)
    assert loaded.negative_rate == 0.5 and loaded.encoder.numerical_encoding == "dense_log"
    assert loaded.meta["train_config"]["embedding_l2_fields"] == {"user_id": 1e-3}


def test_evaluate_outputs(chain):
    a, evaluation = chain["a"], chain["evaluation"]
    assert evaluation["champion_version"] is None  # nothing registered yet
    assert a["evaluation"].metadata["blessed"] == evaluation["decision"]["blessed"]
    assert open(a["eval_report"].path).read().startswith("# Evaluation: ")
    assert a["eval_metrics"].metadata["blessed"] == float(evaluation["decision"]["blessed"])
    for roc, label in zip((a["roc1"], a["roc2"], a["roc3"]), ("click", "authorize", "convert")):
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
    kept = os.path.join(root, "output", "reports", chain["window_end"])
    assert sorted(os.listdir(kept)) == ["evaluation.json", "push.md"]


def test_bad_model_params_is_a_clear_error(chain, tmp_path):
    a = chain["a"]
    with pytest.raises(ValueError, match="model_params"):
        train.python_func(splits=a["splits"], model_name="esmm", model_params="{embed_dim: 4}", epochs=1,
                          batch_size=512, lr=1e-2, seed=0, mlflow_tracking_uri="",
                          model=artifact(dsl.Model, tmp_path, "m"), metrics=artifact(dsl.Metrics, tmp_path, "x"))
