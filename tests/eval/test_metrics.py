import json

import numpy as np
import pytest

from apem.eval.metrics import (auc, calibration_error, calibration_table, evaluate_predictions, funnel_consistency,
                               funnel_consistency_rate, logloss)


def test_auc_rank_formula_with_ties():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_logloss_and_calibration_error_known_values():
    y = np.array([1, 0])
    assert logloss(y, np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    assert calibration_error(rng.random(p.size) < p, p) < 0.01  # calibrated by construction
    assert calibration_error(np.zeros(4), np.full(4, 0.25)) == pytest.approx(0.25)


def test_funnel_consistency_share():
    probs = np.array([[0.5, 0.4, 0.5], [0.2, 0.3, 0.1], [0.3, 0.3, 0.3], [0.9, 0.1, 0.05]])
    assert funnel_consistency(probs).tolist() == [1.0, 0.75, 0.75]
    # rows consistent at every step: only the last row (0.5>=0.4 but 0.4<0.5; 0.2<0.3; 0.3=0.3=0.3 is)
    assert funnel_consistency_rate(probs) == pytest.approx(0.5)
    assert np.isnan(funnel_consistency_rate(np.zeros((0, 3))))


def test_calibration_table_bins_are_equal_count_and_reproduce_the_calibration_error():
    rng = np.random.default_rng(1)
    p = rng.random(1000) * 0.2
    y = (rng.random(p.size) < p).astype(float)
    table = calibration_table(y, p, bins=10)
    assert [row["rows"] for row in table] == [100] * 10
    assert [row["predicted"] for row in table] == sorted(row["predicted"] for row in table)
    ece = sum(row["rows"] * abs(row["predicted"] - row["observed"]) for row in table) / p.size
    assert ece == pytest.approx(calibration_error(y, p, bins=10))


def test_evaluate_predictions_structure_and_subspace_auc():
    labels = np.array([[1, 1], [1, 0], [0, 0], [1, 1], [0, 0], [1, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.3], [0.8, 0.1], [0.2, 0.5], [0.7, 0.6], [0.1, 0.05], [0.6, 0.2]])
    out = evaluate_predictions(labels, probs, ["click", "convert"])
    assert out["rows"] == 6
    click, convert = out["tasks"]["click"], out["tasks"]["convert"]
    assert click["auc"] == 1.0 and click["auc_subspace"] == 1.0
    assert convert["auc"] == pytest.approx(auc(labels[:, 1], probs[:, 1]))
    # subspace: rows with click = 1 -> convert scores [0.3, 0.1, 0.6, 0.2], labels [1, 0, 1, 0]
    assert convert["auc_subspace"] == 1.0 and convert["subspace_rows"] == 4
    assert convert["funnel_consistency"] == pytest.approx(5 / 6)
    assert convert["positives"] == 2
    assert out["funnel_consistency_rate"] == pytest.approx(5 / 6)
    json.dumps(out)


def test_evaluate_predictions_writes_null_for_undefined_auc_and_checks_shapes():
    out = evaluate_predictions(np.zeros((3, 2)), np.full((3, 2), 0.1), ["a", "b"])
    assert out["tasks"]["a"]["auc"] is None
    assert "NaN" not in json.dumps(out)
    with pytest.raises(ValueError, match="rows, 3"):
        evaluate_predictions(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b", "c"])
