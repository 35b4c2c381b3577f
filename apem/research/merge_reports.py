"""One experiment report from several ``apem experiment`` runs over the same split.

A grid of 12 models x 5 seeds takes hours on a few CPU cores, so it is run as several processes,
each with a share of the models (e.g. the cheap baselines on one core, APEM and its ablations on
another). The paired t-tests against APEM and the gains over Single-Task need every model in one
summary: this re-summarises the union of the parts' runs with the same code as a single run
(:func:`apem.research.experiment.write_report`).

Parts must describe the same experiment: the same splits and row counts, labels, oracle, epochs,
batch size, patience and row cap. Each (model, seed) may appear once. What may differ between
parts (their models, their tuned hyperparameters, threads) is kept per part under ``merged_from``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from apem.data.ownership import EXPERIMENT_DIR, claim_output
from apem.research.experiment import write_report

# config keys that define the experiment, so every part must agree on them
SHARED_CONFIG_KEYS = ("train", "val", "test", "rows", "epochs", "batch_size", "patience", "max_rows")
# top-level keys recomputed from the runs, not carried from a part
DERIVED_KEYS = ("completed_runs", "models", "selection_rate", "runs", "plots")
# how long a part took to compute a reference (e.g. the attainable AUC's "seconds"): not part of the result
TIMING_KEYS = ("seconds",)


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def read_report(report_dir: str) -> dict[str, Any]:
    path = os.path.join(report_dir, "report.json")
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as an experiment report ({err})") from None
    config = report.get("config") if isinstance(report, dict) else None
    runs = report.get("runs") if isinstance(report, dict) else None
    if (not isinstance(config, dict) or not isinstance(config.get("models"), list) or not isinstance(runs, list)
            or not all(isinstance(run, dict) and {"model", "seed"} <= set(run) for run in runs)):
        raise ValueError(f"{path}: not an `apem experiment` report (no config with models, or runs "
                         "without model and seed)")
    return report


def _check_same_experiment(reports: dict[str, dict]) -> None:
    (first_dir, first), *rest = reports.items()
    for key in SHARED_CONFIG_KEYS:
        for other_dir, other in rest:
            if first["config"].get(key) != other["config"].get(key):
                raise ValueError(f"{other_dir}: config {key!r} is {other['config'].get(key)!r}, but "
                                 f"{first_dir} has {first['config'].get(key)!r}: not the same experiment")
    for key in (k for k in first if k not in DERIVED_KEYS and k != "config"):
        for other_dir, other in rest:
            if _without_timings(first.get(key)) != _without_timings(other.get(key)):
                raise ValueError(f"{other_dir}: {key!r} differs from {first_dir}'s: not the same experiment")


def _merged_runs(reports: dict[str, dict]) -> tuple[list[dict], list[str]]:
    runs, models, seen = [], [], {}
    for report_dir, report in reports.items():
        for run in report["runs"]:
            key = (run["model"], run["seed"])
            if key in seen:
                raise ValueError(f"{report_dir}: {run['model']} seed {run['seed']} is also in {seen[key]}")
            seen[key] = report_dir
            runs.append(run)
        models += [m for m in report["config"]["models"] if m not in models]
    return runs, models


def merge_experiment_reports(report_dirs: list[str], out_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """Write one report (report.json, report.md, plots) into ``out_dir`` from the runs of ``report_dirs``."""
    if len(report_dirs) < 2:
        raise ValueError("give at least two report directories to merge")
    reports = {d: read_report(d) for d in report_dirs}
    _check_same_experiment(reports)
    claim_output(out_dir, EXPERIMENT_DIR, inputs=tuple(report_dirs), overwrite=overwrite)
    runs, models = _merged_runs(reports)
    first = next(iter(reports.values()))
    header = {k: v for k, v in first.items() if k not in DERIVED_KEYS}
    tuned = {name: chosen for r in reports.values() for name, chosen in (r["config"].get("tuned") or {}).items()
             if name in r["config"]["models"]}  # each model's from the part that ran it
    header["config"] = {**first["config"], "models": models, "tuned": tuned,
                        "merged_from": [{"report": d, "config": r["config"]} for d, r in reports.items()]}
    selection = next((r["selection_rate"] for r in reports.values() if r.get("selection_rate")), None)
    os.makedirs(out_dir, exist_ok=True)
    return write_report(out_dir, header, runs, selection, plots=True)
