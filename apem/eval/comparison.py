"""Candidate against champion on the same test split: metrics, significance, blessing, report.

The candidate and the champion (the registry's ``champion`` alias, see ``apem.release.mlflow_registry``)
each score the test split with their own recalibration to the entire space, so models trained with
different negative rates compare fairly. Per task: the metrics of ``apem.eval.metrics``, DeLong's paired
test and the paired bootstrap (``apem.eval.significance``), then the blessing rule (``apem.eval.blessing``)
decides. Without a champion each model is compared with chance (AUC 0.5).

Outputs (``write_outputs``): ``evaluation.json`` (everything below), ``report.md`` (the decision,
its reasons and the per-task table) and ROC points per task for KFP's ``ClassificationMetrics``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from apem.eval.blessing import BlessingRule, decide
from apem.eval.metrics import calibration_table, evaluate_predictions
from apem.eval.significance import delong_test, delong_vs_chance, paired_bootstrap
from apem.inference.model_dir import load_model

EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.md"
ROC_POINTS = 101  # KFP's UI draws every point it gets; a hundred is a smooth curve


def roc_points(labels: np.ndarray, scores: np.ndarray, max_points: int = ROC_POINTS) -> dict:
    """ROC curve at up to ``max_points`` thresholds (score quantiles), as KFP's ClassificationMetrics
    wants it: lists ``fpr``, ``tpr``, ``thresholds`` with thresholds decreasing."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return {"fpr": [], "tpr": [], "thresholds": []}
    thresholds = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, max_points)))[::-1]
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], labels[order]
    true_pos, false_pos = np.cumsum(sorted_pos), np.cumsum(~sorted_pos)
    # rows predicted positive at threshold t: score >= t
    taken = np.searchsorted(-sorted_scores, -thresholds, side="right")
    tp = np.where(taken > 0, true_pos[np.maximum(taken - 1, 0)], 0)
    fp = np.where(taken > 0, false_pos[np.maximum(taken - 1, 0)], 0)
    fpr, tpr = np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]
    thresholds = np.r_[1.0 + thresholds[0], thresholds]  # KFP convention: first point predicts nothing
    return {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(), "thresholds": thresholds.round(6).tolist()}


def _nan_test(method: str, auc_a: float, auc_b: float, why: str) -> dict:
    nan = float("nan")
    return {"method": method, "auc_a": auc_a, "auc_b": auc_b, "delta": nan, "se": nan, "z": nan,
            "p_two_sided": nan, "p_worse": nan, "p_better": nan, "ci_low": nan, "ci_high": nan, "error": why}


def compare_task(labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray | None,
                 bootstrap_resamples: int = 200, seed: int = 0) -> dict:
    """DeLong and paired bootstrap for one task: candidate vs champion, or vs chance without one."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        why = f"one class only ({int(labels.sum())} positives of {labels.size} rows)"
        return {"delong": _nan_test("delong", float("nan"), float("nan"), why),
                "bootstrap": _nan_test("bootstrap", float("nan"), float("nan"), why)}
    if champion is None:
        reference = np.zeros_like(candidate)  # a constant scorer: AUC 0.5 on every resample
        delong = delong_vs_chance(labels, candidate)
    else:
        reference = champion
        delong = delong_test(labels, candidate, champion)
    boot = paired_bootstrap(labels, candidate, reference, resamples=bootstrap_resamples, seed=seed)
    return {"delong": delong.to_dict(), "bootstrap": {
        **boot.test.to_dict(), "resamples": boot.resamples, "percentile_low": boot.percentile_low,
        "percentile_high": boot.percentile_high, "share_worse": boot.share_worse}}


def compare(labels: np.ndarray, label_names: list[str], candidate: np.ndarray, champion: np.ndarray | None,
            rule: BlessingRule, bootstrap_resamples: int = 200, seed: int = 0,
            champion_version: str | None = None) -> dict:
    """Per-task comparison, the blessing decision and candidate ROC curves from score matrices (rows, tasks)."""

    comparison = {
        name: compare_task(labels[:, k], candidate[:, k], None if champion is None else champion[:, k],
                           bootstrap_resamples, seed + k)
        for k, name in enumerate(label_names)
    }
    decision = decide(list(label_names), {n: comparison[n][rule.test] for n in label_names}, rule,
                      has_champion=champion is not None)
    decision = {**decision.to_dict(), "champion_version": champion_version if champion is not None else None}
    return {
        "labels": list(label_names),
        "rows": int(labels.shape[0]),
        "positives": {n: int(labels[:, k].sum()) for k, n in enumerate(label_names)},
        "candidate": evaluate_predictions(labels, candidate, list(label_names)),
        "champion": None if champion is None else evaluate_predictions(labels, champion, list(label_names)),
        "comparison": comparison,
        "decision": decision,
        "champion_version": decision["champion_version"],
        "roc": {n: roc_points(labels[:, k], candidate[:, k]) for k, n in enumerate(label_names)},
        # the candidate's scores are already recalibrated to the entire space (compare_with_champion)
        "calibration": {n: calibration_table(labels[:, k], candidate[:, k]) for k, n in enumerate(label_names)},
    }


def compare_with_champion(candidate_dir: str, test_dir: str, champion_dir: str | None = None,
             champion_version: str | None = None, rule: BlessingRule | None = None,
             bootstrap_resamples: int = 200, seed: int = 0) -> dict:
    """Score the test split with the candidate (and the champion, if any) and decide.

    The decision carries ``champion_version`` so that the push can refuse if the champion moved.
    """
    rule = rule or BlessingRule()
    candidate_model = load_model(candidate_dir)
    candidate, dataset = candidate_model.predict_dataset(test_dir, recalibrate=True)
    labels = dataset.labels()
    champion = None
    if champion_dir is not None:
        # a champion whose spec differs from the test split's is a DatasetError naming both
        champion, _ = load_model(champion_dir).predict_dataset(test_dir, recalibrate=True)
    result = compare(labels, list(dataset.spec.labels), np.asarray(candidate), champion, rule,
                     bootstrap_resamples, seed, champion_version)
    result["test_dir"], result["candidate_dir"] = test_dir, candidate_dir
    return result


def summary_metrics(result: dict) -> dict[str, float]:
    """Flat scalars for KFP ``Metrics`` and MLflow: blessed, and per task AUCs, delta and p-values."""
    out = {"blessed": float(result["decision"]["blessed"]),
           "has_champion": float(result["decision"]["has_champion"]),
           "funnel_consistency_rate": result["candidate"].get("funnel_consistency_rate")}
    for name in result["labels"]:
        out[f"{name}_auc"] = result["candidate"]["tasks"][name]["auc"]
        out[f"{name}_funnel_consistency"] = result["candidate"]["tasks"][name]["funnel_consistency"]
        delong = result["comparison"][name]["delong"]
        if result["champion"] is not None:
            out[f"{name}_champion_auc"] = result["champion"]["tasks"][name]["auc"]
            out[f"{name}_auc_delta"] = delong["delta"]
        out[f"{name}_delong_p_worse"] = delong["p_worse"]
        out[f"{name}_bootstrap_p_worse"] = result["comparison"][name]["bootstrap"]["p_worse"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def format_cell(value, spec: str = ".4f", missing: str = "–") -> str:
    """A number for a Markdown table cell (every report's one formatter); ``missing`` for None, NaN or
    infinity (a model without a result, a one-seed std, a task without positives), so a report never
    shows "nan"."""
    if value is None or not math.isfinite(float(value)):
        return missing
    return format(float(value), spec)


def _fmt(value, spec: str = ".4f") -> str:
    return format_cell(value, spec, missing="n/a")


def render_report(result: dict) -> str:
    """The decision, its reasons, and per-task metrics and tests, as Markdown."""
    decision = result["decision"]
    against = f"champion version {result['champion_version']}" if decision["has_champion"] else "chance (no champion yet)"
    lines = [
        f"# Evaluation: {'BLESSED' if decision['blessed'] else 'NOT BLESSED'}",
        "",
        f"Candidate against {against} on the same test split: {result['rows']} rows "
        f"({', '.join(f'{n}: {p} positives' for n, p in result['positives'].items())}).",
        "",
        "## Reasons", "",
    ] + [f"- {r}" for r in decision["reasons"]] + [
        "", "## Per task", "",
        "| task | candidate AUC | reference AUC | delta | DeLong 95% CI | DeLong p (worse) | bootstrap p (worse) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in result["labels"]:
        d, b = result["comparison"][name]["delong"], result["comparison"][name]["bootstrap"]
        lines.append(
            f"| {name} | {_fmt(d['auc_a'])} | {_fmt(d['auc_b'])} | {_fmt(d['delta'], '+.4f')} | "
            f"[{_fmt(d['ci_low'], '+.4f')}, {_fmt(d['ci_high'], '+.4f')}] | {_fmt(d['p_worse'], '.3g')} | "
            f"{_fmt(b['p_worse'], '.3g')} |"
        )
    lines += _calibration_section(result)
    lines += ["", "## Candidate metrics", "", "```json",
              json.dumps(result["candidate"], indent=2, default=float), "```", ""]
    lines += ["## Rule", "", BlessingRule.from_dict(decision["rule"]).describe() + ".", "",
              f"`{json.dumps(decision['rule'])}`", ""]
    return "\n".join(lines)


def _calibration_section(result: dict) -> list[str]:
    """Per step: the candidate's reliability table after recalibration, and its funnel consistency."""
    rate = result["candidate"].get("funnel_consistency_rate")
    lines = ["", "## Calibration after recalibration", "",
             f"Funnel consistency rate (rows with f_i <= f_(i-1) at every step): {_fmt(rate)}", ""]
    for name in result["labels"]:
        lines += [f"### {name}", "", "| bin | mean predicted | observed rate | rows |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {row['predicted']:.5f} | {row['observed']:.5f} | {row['rows']} |"
                  for i, row in enumerate(result.get("calibration", {}).get(name, []))]
        lines.append("")
    return lines


def write_outputs(result: dict, out_dir: str) -> dict[str, str]:
    """Write ``evaluation.json`` and ``report.md`` under ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"evaluation": os.path.join(out_dir, EVALUATION_FILE), "report": os.path.join(out_dir, REPORT_FILE)}
    with open(paths["evaluation"], "w") as fh:
        json.dump(result, fh, indent=2, default=float)
    with open(paths["report"], "w") as fh:
        fh.write(render_report(result))
    return paths

