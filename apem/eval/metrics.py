"""Metrics on entire-space predictions. Written to JSON as {"tasks": {label: {...}}}."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half. NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if y.size else float("nan")


def calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-count bins of the predictions:
    sum_b (n_b / n) |mean(p_b) - mean(y_b)|. Equal-count bins keep it meaningful for rare events."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, y.size)):
        total += chunk.size * abs(p[chunk].mean() - y[chunk].mean())
    return float(total / y.size)


def calibration_table(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict]:
    """Reliability table over ``bins`` equal-count bins (the bins of :func:`calibration_error`):
    per bin the mean prediction, the observed rate and the rows, lowest predictions first."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    return [{"predicted": float(p[chunk].mean()), "observed": float(y[chunk].mean()), "rows": int(chunk.size)}
            for chunk in np.array_split(order, min(bins, y.size)) if chunk.size]


def funnel_consistency_rate(probs: np.ndarray) -> float:
    """Share of rows consistent at every step: f_i <= f_{i-1} for all i (NaN without rows)."""
    p = np.asarray(probs)
    if p.shape[0] == 0:
        return float("nan")
    return float((p[:, 1:] <= p[:, :-1]).all(axis=1).mean())


def funnel_consistency(probs: np.ndarray) -> np.ndarray:
    """Per step, the share of rows with f_i <= f_{i-1} (1.0 for the first step, which has no predecessor)."""
    p = np.asarray(probs)
    if p.shape[0] == 0:
        return np.full(p.shape[1], np.nan)
    return np.concatenate([[1.0], (p[:, 1:] <= p[:, :-1]).mean(axis=0)])


def evaluate_predictions(labels: np.ndarray, probs: np.ndarray, label_names) -> dict:
    """Per-task metrics of entire-space predictions, JSON-able.

    For each funnel step i: ``auc`` on the entire space; ``auc_subspace``, the AUC on rows whose
    previous step is positive (the "CVR-style" AUC; equal to ``auc`` for the first step);
    ``logloss``; ``calibration_error`` (see :func:`calibration_error`); ``funnel_consistency``
    (share of rows with f_i <= f_{i-1}); ``positives``, ``rows`` and ``subspace_rows``. NaN (no positives, or no
    negatives) is written as null. Over all steps: ``funnel_consistency_rate`` (rows consistent at every step).
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    names = list(label_names)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(f"labels {y.shape} and probs {p.shape} must both be (rows, {len(names)})")
    consistency = funnel_consistency(p)
    tasks = {}
    for i, name in enumerate(names):
        sub = y[:, i - 1] == 1 if i else np.ones(len(y), dtype=bool)
        tasks[name] = {
            "auc": auc(y[:, i], p[:, i]),
            "auc_subspace": auc(y[sub, i], p[sub, i]),
            "logloss": logloss(y[:, i], p[:, i]),
            "calibration_error": calibration_error(y[:, i], p[:, i]),
            "funnel_consistency": float(consistency[i]),
            "positives": int(y[:, i].sum()),
            "rows": int(len(y)),
            "subspace_rows": int(sub.sum()),
        }
        tasks[name] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in tasks[name].items()}
    return {"tasks": tasks, "rows": int(len(y)), "funnel_consistency_rate": funnel_consistency_rate(p)}
