import json
import os

import numpy as np
import pytest
import torch

from apem.release import mlflow_registry
from apem.eval.blessing import BlessingRule
from apem.eval.comparison import (
    compare,
    compare_with_champion,
    render_report,
    roc_points,
    summary_metrics,
    write_outputs,
)
from apem.release.champion import evaluate_against_registry
from apem.eval.metrics import auc

LABELS = ["click", "authorize", "convert"]


def funnel_scores(rows, seed, strength):
    """Funnel labels (a step only after the one before) and scores of the given per-task strength."""
    rng = np.random.default_rng(seed)
    click = rng.random(rows) < 0.3
    authorize = click & (rng.random(rows) < 0.5)
    convert = authorize & (rng.random(rows) < 0.5)
    labels = np.stack([click, authorize, convert], axis=1).astype(np.float32)
    noise = rng.normal(size=(rows, 3))
    return labels, 1 / (1 + np.exp(-(labels * np.asarray(strength) + noise)))


def test_clearly_worse_candidate_is_not_blessed_and_tests_agree():
    labels, champion = funnel_scores(6000, seed=0, strength=(1.5, 1.5, 1.5))
    rng = np.random.default_rng(1)
    candidate = champion.copy()
    candidate[:, 1] = 1 / (1 + np.exp(-(labels[:, 1] * 0.3 + rng.normal(size=len(labels)))))
    result = compare(labels, LABELS, candidate, champion, BlessingRule(), bootstrap_resamples=300)
    assert not result["decision"]["blessed"] and result["decision"]["has_champion"]
    assert any(r.startswith("authorize: significantly worse") for r in result["decision"]["reasons"])
    delong, boot = result["comparison"]["authorize"]["delong"], result["comparison"]["authorize"]["bootstrap"]
    assert delong["p_worse"] < 1e-3 and boot["p_worse"] < 1e-3 and boot["share_worse"] > 0.99
    assert delong["delta"] == pytest.approx(boot["delta"])
    assert result["candidate"]["tasks"]["authorize"]["auc"] == pytest.approx(delong["auc_a"])
    # unchanged tasks: delta exactly 0, never "worse"
    assert result["comparison"]["click"]["delong"]["delta"] == 0


def test_first_model_against_chance_and_bootstrap_rule():
    labels, scores = funnel_scores(4000, seed=2, strength=(1.0, 1.0, 1.0))
    result = compare(labels, LABELS, scores, None, BlessingRule(test="bootstrap"), bootstrap_resamples=200)
    assert result["decision"]["blessed"] and not result["decision"]["has_champion"]
    assert result["champion"] is None
    for name in LABELS:
        assert result["comparison"][name]["bootstrap"]["auc_b"] == pytest.approx(0.5)
        assert result["comparison"][name]["delong"]["auc_b"] == 0.5


def test_task_with_one_class_blocks_with_reason():
    labels, scores = funnel_scores(2000, seed=3, strength=(1.0, 1.0, 1.0))
    labels[:, 2] = 0
    result = compare(labels, LABELS, scores, scores, BlessingRule(), bootstrap_resamples=50)
    assert not result["decision"]["blessed"]
    assert any("convert: AUC could not be computed" in r for r in result["decision"]["reasons"])
    assert "n/a" in render_report(result)
    assert "convert_auc" not in summary_metrics(result)  # no NaN reaches KFP Metrics


def test_roc_points_trace_the_curve():
    labels, scores = funnel_scores(5000, seed=4, strength=(1.0, 1.0, 1.0))
    curve = roc_points(labels[:, 0], scores[:, 0])
    fpr, tpr, thr = map(np.asarray, (curve["fpr"], curve["tpr"], curve["thresholds"]))
    assert len(fpr) <= 102 and (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (np.diff(thr) < 0).all()
    # each point is the exact rate at its threshold
    k = len(thr) // 2
    predicted = scores[:, 0] >= thr[k]
    assert tpr[k] == pytest.approx(predicted[labels[:, 0] == 1].mean(), abs=1e-6)
    assert fpr[k] == pytest.approx(predicted[labels[:, 0] == 0].mean(), abs=1e-6)
    assert np.trapz(tpr, fpr) == pytest.approx(auc(labels[:, 0], scores[:, 0]), abs=0.01)
    assert roc_points(np.zeros(10), np.arange(10)) == {"fpr": [], "tpr": [], "thresholds": []}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A split of synthetic data and two quickly trained models on it (1 epoch, tiny config)."""
    from apem.data.spec import write_dataset
    from apem.data.features import default_spec
    from apem.research.synth import SynthConfig, generate
    from apem.train.trainer import TrainConfig
    from apem.train.from_dirs import train_from_dirs

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval")
    table = generate(SynthConfig(rows=5000, days=5, seed=11))[0].sort_by("event_time")
    cut = int(table.num_rows * 0.6)
    write_dataset(table.slice(0, cut), default_spec(), str(root / "train"))
    write_dataset(table.slice(cut), default_spec(), str(root / "test"))
    models = {}
    for name, lr in (("a", 1e-2), ("b", 1e-3)):
        config = TrainConfig(epochs=1, batch_size=512, lr=lr, progress=False, patience=1)
        train_from_dirs(str(root / "train"), str(root / "test"), str(root / name), model_name="esmm",
                        model_overrides={"embed_dim": 4, "tower_hidden": [8]}, config=config)
        models[name] = str(root / name)
    return root, models


def test_evaluate_real_models_and_champion_from_registry(tiny_models, tmp_path):
    root, models = tiny_models
    test_dir = str(root / "test")
    uri = mlflow_registry.sqlite_tracking_uri(str(tmp_path / "mlflow"))

    first = evaluate_against_registry(models["a"], test_dir, uri, "apem-eval", bootstrap_resamples=50)
    assert first["champion_version"] is None and not first["decision"]["has_champion"]
    assert first["rows"] == first["candidate"]["rows"] > 0

    version = mlflow_registry.register_model(models["b"], uri, "apem-eval").version
    mlflow_registry.set_champion(uri, "apem-eval", version)
    result = evaluate_against_registry(models["a"], test_dir, uri, "apem-eval", bootstrap_resamples=50)
    assert result["champion_version"] == version == result["decision"]["champion_version"]
    direct = compare_with_champion(models["a"], test_dir, champion_dir=models["b"], champion_version=version,
                      bootstrap_resamples=50)
    for name in LABELS:  # the champion fetched from MLflow scores exactly like its source directory
        assert result["champion"]["tasks"][name] == direct["champion"]["tasks"][name]
        assert result["comparison"][name]["delong"] == direct["comparison"][name]["delong"]
    assert result["decision"] == direct["decision"]

    same = compare_with_champion(models["a"], test_dir, champion_dir=models["a"], champion_version="7", bootstrap_resamples=50)
    assert all(same["comparison"][n]["delong"]["delta"] == 0 for n in LABELS)
    assert same["decision"]["blessed"]  # identical to the champion: not worse anywhere

    paths = write_outputs(result, str(tmp_path / "out"))
    with open(paths["evaluation"]) as fh:
        assert json.load(fh)["decision"] == result["decision"]
    report = open(paths["report"]).read()
    assert report.startswith("# Evaluation: ") and f"champion version {version}" in report
    assert all(reason in report for reason in result["decision"]["reasons"])
    metrics = summary_metrics(result)
    assert metrics["blessed"] == float(result["decision"]["blessed"]) and "convert_delong_p_worse" in metrics
    assert os.path.isdir(models["a"])
