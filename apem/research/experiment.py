"""The reproducible comparison behind ``apem experiment`` (paper Tables 3-4, Figures 7-8).

Every model x seed trains on the same encoded split with the same trainer, early-stops on the
validation split only, and is scored on the test split. The report aggregates AUC mean and std per
task over seeds, the gain over Single-Task, paired t-tests over seeds against APEM, efficiency numbers
(Fig 8) and, when the data carries it, the oracle AUC of the true probabilities. Plots: per-task AUC,
efficiency, and the histogram of APEM's dynamic-selector selection rate (Fig 7a).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from apem.data.encoding import FeatureEncoder
from apem.data.oracle import read_generator, read_oracle
from apem.data.split_record import negative_rate_beside
from apem.data.ownership import EXPERIMENT_DIR, claim_output
from apem.data.spec import Dataset, check_same_spec, read_dataset
from apem.eval.comparison import format_cell
from apem.eval.metrics import auc, evaluate_predictions
from apem.inference.predict import predict
from apem.models import build_model, list_models
from apem.research.ceiling import attainable_aucs
from apem.train.trainer import TrainConfig, encode_dataset, fit, set_seed

REFERENCE_MODEL = "apem"
BASELINE_MODEL = "single_task"


def resolve_model_names(text: str | list[str]) -> list[str]:
    """``all`` or a comma-separated list of registry names, order kept, duplicates dropped."""
    known = list_models()
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError("no models given")
    resolved: list[str] = []
    for name in names:
        expanded = known if name == "all" else [name]
        for n in expanded:
            if n not in known:
                raise ValueError(f"unknown model {n!r}; choose from all, {', '.join(known)}")
            if n not in resolved:
                resolved.append(n)
    return resolved


def paired_t_test(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``) of a against b over seeds.

    NaN with fewer than two pairs; 1.0 when every pair is identical (scipy would give NaN there).
    """
    from scipy.stats import ttest_rel

    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples need equal lengths, got {a_arr.size} and {b_arr.size}")
    if a_arr.size < 2:
        return float("nan")
    if np.array_equal(a_arr, b_arr):
        return 1.0
    return float(ttest_rel(a_arr, b_arr).pvalue)


@dataclass
class ExperimentConfig:
    models: list[str] = field(default_factory=lambda: list_models())
    seeds: int = 5
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    patience: int = 2
    max_rows: int | None = None
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    selection_rate_bins: int = 20
    numerical_encoding: str = "log_round"
    embedding_l2: float = 0.0
    embedding_l2_fields: dict[str, float] = field(default_factory=dict)
    # per-model hyperparameters chosen by `apem tune` (model config overrides plus "lr"), by model name
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)


def state_dict_bytes(model) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def head_rows(dataset, max_rows: int | None):
    """The first ``max_rows`` rows (the datasets are in time order, so this keeps chronology)."""

    if max_rows is None or len(dataset) <= max_rows:
        return dataset
    return Dataset(dataset.spec, dataset.table.slice(0, max_rows), dataset.path, dataset.funnel)


def oracle_aucs(test, oracle_table, labels: np.ndarray) -> dict[str, Any] | None:
    """AUC of the true probabilities per task on the test rows (joined on the spec's id column)."""

    spec = test.spec
    if oracle_table is None or not spec.id_column or spec.id_column not in oracle_table.column_names:
        return None
    import pandas as pd

    ids = test.table.column(spec.id_column).to_numpy()
    positions = pd.Index(oracle_table.column(spec.id_column).to_numpy()).get_indexer(ids)
    found = positions >= 0
    if not found.any():
        return None
    rows = positions[found]
    result: dict[str, Any] = {"matched_rows": int(found.sum()), "test_rows": int(len(ids)), "tasks": {}}
    for i, label in enumerate(spec.labels):
        column = f"p_{label}"
        if column in oracle_table.column_names:
            truth = oracle_table.column(column).to_numpy()[rows]
            result["tasks"][label] = auc(labels[found, i], truth)
    return result


def _train_one(name: str, seed: int, data: dict, config: ExperimentConfig) -> tuple[dict, Any]:

    set_seed(seed)
    chosen = dict(config.tuned.get(name, {}))
    lr = chosen.pop("lr", config.lr)
    l2 = chosen.pop("embedding_l2", config.embedding_l2)
    chosen.pop("numerical_encoding", None)  # already applied: ``data`` is encoded with the model's choice
    model = build_model(name, data["fields"], len(data["labels"]), chosen or None)
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=lr, seed=seed,
                               device=config.device, patience=config.patience, num_threads=config.num_threads,
                               progress=False, embedding_l2=l2, embedding_l2_fields=config.embedding_l2_fields)
    result = fit(model, data["train"], data["val"], train_config)
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    model = model.to("cpu").eval()
    start = time.perf_counter()
    probs = predict(model, data["test"].x)
    inference_seconds = time.perf_counter() - start
    y_test = data["test"].y.numpy()
    metrics = evaluate_predictions(y_test, probs, list(data["labels"]))
    record = {
        "model": name,
        "seed": seed,
        "auc": {label: auc(y_test[:, i], probs[:, i]) for i, label in enumerate(data["labels"])},
        "val_auc": dict(zip(data["labels"], best.get("val_auc", []))),
        "numerical_encoding": data["encoding"],
        "hyperparameters": {"lr": lr, "embedding_l2": l2, **chosen},
        "metrics": metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "val_auc_by_epoch": [h.get("val_auc_mean") for h in result.history],
        "seconds_per_epoch": float(result.seconds_per_epoch),
        "inference_seconds": inference_seconds,
        "parameters": parameter_count(model),
        "model_bytes": state_dict_bytes(model),
        "error": None,
    }
    return record, model


def _selection_rates(model, x, batch_size: int = 65536) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model.selection_rates(x[i:i + batch_size]).float().cpu()
                          for i in range(0, len(x), batch_size)]).numpy()


def selection_rate_summary(model, x, bins: int, batch_size: int = 65536) -> dict[str, Any]:
    """Fig 7a: the share of non-zero z_K per test sample from ``APEM.selection_rates``."""
    rates = _selection_rates(model, x, batch_size)
    counts, edges = np.histogram(rates, bins=bins, range=(0.0, 1.0))
    return {"mean": float(rates.mean()), "std": float(rates.std()), "median": float(np.median(rates)),
            "samples": int(len(rates)), "distinct_rates": int(len(np.unique(rates))), "quantiles": {
                str(q): float(np.quantile(rates, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)},
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}


def tower_inputs(model, x, batch_size: int = 65536) -> np.ndarray:
    """Each sample's representation: what the model hands its task towers, (B, N * in), flattened.

    Read with a forward pre-hook on ``model.towers`` (every model has one), so no model needs a
    method of its own for Fig 7b."""
    import torch

    captured: list = []
    handle = model.towers.register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1).cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


def selection_pca(model, x, seed: int, share: float = 0.01, max_points: int = 300) -> dict[str, Any]:
    """Fig 7b: a 2-D PCA of sample representations for the top ``share``, the middle ``share`` (around
    the median) and the bottom ``share`` of selection rates. Ties (for example every rate 1.0) are
    broken at random with ``seed``, so tied groups are random samples and say so by their equal rates."""
    rates = _selection_rates(model, x)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(rates))
    order = shuffled[np.argsort(rates[shuffled], kind="stable")]
    size = max(1, int(len(rates) * share))
    middle = len(rates) // 2 - size // 2
    groups = {"bottom": order[:size], "middle": order[middle:middle + size], "top": order[-size:]}
    picked = {k: rng.choice(v, min(len(v), max_points), replace=False) for k, v in groups.items()}
    reps = tower_inputs(model, x[np.concatenate(list(picked.values()))])
    centered = reps - reps.mean(axis=0)
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)
    coords = centered @ vt[:2].T
    explained = (singular ** 2 / max(float((singular ** 2).sum()), 1e-12))[:2]
    bounds = np.cumsum([0] + [len(v) for v in picked.values()])
    return {"share": share, "group_size": size, "explained_variance_ratio": explained.tolist(),
            "groups": {k: {"mean_rate": float(rates[groups[k]].mean()),
                           "points": coords[a:b].round(5).tolist()}
                       for k, a, b in zip(picked, bounds[:-1], bounds[1:])}}


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _nan_to_none(value.item())
    return value


def share_of_gap(auc_mean: dict[str, float], reference: dict | None, labels: list[str]) -> dict[str, float] | None:
    """(AUC - 0.5) / (reference AUC - 0.5) per task: the share of the gap above chance a model closes."""
    if not reference or not reference.get("tasks"):
        return None
    tasks = reference["tasks"]
    return {k: (auc_mean[k] - 0.5) / (tasks[k] - 0.5) if tasks.get(k) not in (None, 0.5) else float("nan")
            for k in labels}


def summarize(runs: list[dict], labels: list[str], models: list[str], oracle: dict | None,
              attainable: dict | None = None) -> dict[str, Any]:
    """Aggregate per-seed runs into one entry per model (means, stds, t-tests vs APEM, gains, efficiency)."""
    by_model: dict[str, dict[int, dict]] = {m: {} for m in models}
    errors: dict[str, list[dict]] = {m: [] for m in models}
    for run in runs:
        if run.get("error"):
            errors[run["model"]].append({"seed": run["seed"], "error": run["error"]})
        else:
            by_model[run["model"]][run["seed"]] = run
    summary: dict[str, Any] = {}
    for name in models:
        ok = by_model[name]
        entry: dict[str, Any] = {"seeds_ok": sorted(ok), "errors": errors[name]}
        aucs = {label: [ok[s]["auc"][label] for s in sorted(ok)] for label in labels}
        entry["aucs"] = aucs
        entry["auc_mean"] = {k: float(np.mean(v)) if v else float("nan") for k, v in aucs.items()}
        entry["auc_std"] = {k: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for k, v in aucs.items()}
        val = {label: [ok[s].get("val_auc", {}).get(label, float("nan")) for s in sorted(ok)] for label in labels}
        entry["val_auc_mean"] = {k: float(np.mean(v)) if v else float("nan") for k, v in val.items()}
        entry["val_auc_std"] = {k: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for k, v in val.items()}
        subspace = {label: [ok[s]["metrics"]["tasks"][label]["auc_subspace"] for s in sorted(ok)] for label in labels}
        entry["auc_subspace_mean"] = {k: float(np.mean([a for a in v if a is not None])) if any(a is not None for a in v)
                                      else float("nan") for k, v in subspace.items()}
        for key in ("seconds_per_epoch", "inference_seconds"):
            entry[key] = float(np.mean([r[key] for r in ok.values()])) if ok else float("nan")
        for key in ("parameters", "model_bytes"):
            entry[key] = next((r[key] for r in ok.values()), None)
        entry["best_epochs"] = [ok[s]["best_epoch"] for s in sorted(ok)]
        if oracle and oracle.get("tasks"):
            entry["captured_fraction"] = share_of_gap(entry["auc_mean"], oracle, labels)
        if attainable and attainable.get("tasks"):
            entry["reachable_gap_closed"] = share_of_gap(entry["auc_mean"], attainable, labels)
        summary[name] = entry
    reference, baseline = by_model.get(REFERENCE_MODEL, {}), by_model.get(BASELINE_MODEL, {})
    for name, entry in summary.items():
        common = sorted(set(reference) & set(by_model[name]))
        entry["p_value_vs_apem"] = {
            label: (float("nan") if name == REFERENCE_MODEL else
                    paired_t_test([reference[s]["auc"][label] for s in common],
                                  [by_model[name][s]["auc"][label] for s in common]))
            for label in labels}
        entry["gain_over_single_task"] = {
            label: (entry["auc_mean"][label] - summary[BASELINE_MODEL]["auc_mean"][label])
            / summary[BASELINE_MODEL]["auc_mean"][label] if baseline else float("nan")
            for label in labels}
    return summary


def render_markdown(report: dict[str, Any]) -> str:
    labels, models = report["labels"], report["models"]
    cfg = report["config"]
    lines = [
        "# APEM experiment report", "",
        f"Train {cfg['rows']['train']} rows, val {cfg['rows']['val']}, test {cfg['rows']['test']}; "
        f"{cfg['seeds']} seeds; up to {cfg['epochs']} epochs (early stopping on val AUC, patience "
        f"{cfg['patience']}); batch {cfg['batch_size']}; lr {cfg['lr']}. Completed runs: "
        f"{report.get('completed_runs', '?')} of {len(cfg['models']) * cfg['seeds']}.",
        "AUC on the test split (entire space), mean ± std over seeds. Gain: relative to Single-Task. "
        "p: paired t-test over seeds against APEM (two-sided).", "",
    ]
    header = ["model"] + [f"{l} AUC" for l in labels] + [f"{l} gain" for l in labels] + [f"{l} p" for l in labels]
    header += ["s/epoch", "inference s", "params", "size MB", "errors"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    oracle = report.get("oracle_auc")
    if oracle and oracle.get("tasks"):
        row = ["oracle (true probabilities)"] + [format_cell(oracle["tasks"].get(l)) for l in labels]
        row += [""] * (2 * len(labels) + 5)
        lines.append("| " + " | ".join(row) + " |")
    attainable = report.get("attainable_auc")
    if attainable and attainable.get("tasks"):
        row = ["attainable (generator known, user vectors estimated)"]
        row += [format_cell(attainable["tasks"].get(l)) for l in labels] + [""] * (2 * len(labels) + 5)
        lines.append("| " + " | ".join(row) + " |")
    for name, entry in models.items():
        row = [name]
        row += [f"{format_cell(entry['auc_mean'][l])} ± {format_cell(entry['auc_std'][l])}" for l in labels]
        gains = [entry["gain_over_single_task"][l] for l in labels]
        row += ["–" if g is None else f"{100 * g:+.2f}%" for g in gains]
        row += [format_cell(entry["p_value_vs_apem"][l], ".3g") for l in labels]
        size = entry["model_bytes"] / 1e6 if entry["model_bytes"] else None
        row += [format_cell(entry["seconds_per_epoch"], ".2f"), format_cell(entry["inference_seconds"], ".3f"),
                str(entry["parameters"] or "–"), format_cell(size, ".2f"), str(len(entry["errors"]))]
        lines.append("| " + " | ".join(row) + " |")
    failed = [(n, e) for n, entry in models.items() for e in entry["errors"]]
    if failed:
        lines += ["", "## Errors", ""] + [f"- {n} seed {e['seed']}: {e['error']}" for n, e in failed]
    lines += _reference_lines(report)
    lines += _tuned_lines(cfg)
    lines += _selection_lines(report.get("selection_rate"))
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(lines) + "\n"


def _tuned_lines(cfg: dict[str, Any]) -> list[str]:
    """Each model's hyperparameters from ``--tuned`` (the rest run with the settings above)."""
    tuned = cfg.get("tuned") or {}
    if not tuned:
        return []
    lines = ["", "## Tuned hyperparameters (`--tuned`)", ""]
    for name in cfg["models"]:
        chosen = tuned.get(name)
        text = ", ".join(f"{k} {format_cell(v, '.3g') if isinstance(v, float) else v}"
                         for k, v in chosen.items()) if chosen else "none: the settings above"
        lines.append(f"- {name}: {text}")
    return lines


def _reference_lines(report: dict[str, Any]) -> list[str]:
    """Per model and task, the share of the gap above chance closed: of the attainable reference
    (what a learner of these training rows could reach) and of the Bayes oracle."""
    labels, models = report["labels"], report["models"]
    attainable = report.get("attainable_auc")
    if not attainable or not attainable.get("tasks"):
        return []
    plug_in = ", ".join(f"{l} {format_cell((attainable.get('map_tasks') or {}).get(l))}" for l in labels)
    lines = ["", "## Against the references", "",
             f"Attainable: the generator known except the user vectors, which are estimated from each user's "
             f"training rows ({attainable['train_rows']} rows, {attainable['users_with_training_rows']} of "
             f"{attainable['users']} users; apem.research.ceiling): probabilities averaged over each vector's "
             f"Laplace posterior around its MAP (the MAP plug-in instead: {plug_in}). "
             "Share of the reachable gap closed: (AUC - 0.5) / (attainable - 0.5); of the oracle's: "
             "(AUC - 0.5) / (oracle - 0.5).", ""]
    header = ["model"] + [f"{l} of attainable" for l in labels] + [f"{l} of oracle" for l in labels]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in models.items():
        closed, captured = entry.get("reachable_gap_closed") or {}, entry.get("captured_fraction") or {}
        row = ([name] + [format_cell(closed.get(l), ".3f") for l in labels]
               + [format_cell(captured.get(l), ".3f") for l in labels])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _selection_lines(sel: dict | None) -> list[str]:
    if not sel:
        return []
    lines = ["", "## Dynamic selector (Fig 7)", "",
             f"Fig 7a: APEM selection rate on test (seed {sel['seed']}, {sel.get('samples', '?')} samples): mean "
             f"{sel['mean']:.3f}, std {sel['std']:.3f}, median {sel['quantiles']['0.5']:.3f}, "
             f"1%/99% quantiles {sel['quantiles']['0.01']:.3f}/{sel['quantiles']['0.99']:.3f}."]
    pca = sel.get("pca")
    if pca:
        means = ", ".join(f"{k} {v['mean_rate']:.3f}" for k, v in pca["groups"].items())
        ratio = ", ".join(f"{r:.2f}" for r in pca["explained_variance_ratio"])
        lines.append(f"Fig 7b: 2-D PCA of the task-tower inputs of the bottom, middle and top "
                     f"{100 * pca['share']:.0f}% of selection rates ({pca['group_size']} samples each; mean rates "
                     f"{means}; explained variance {ratio}).")
    return lines


def _plot_selection(selection: dict, out_dir: str, plt) -> list[str]:
    """Fig 7a (histogram of selection rates) and Fig 7b (PCA of the rate groups), as PNGs."""
    written = []
    histogram = selection["histogram"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stairs(histogram["counts"], histogram["edges"], fill=True, color="tab:green")
    ax.axvline(selection["mean"], color="k", label=f"mean {selection['mean']:.3f} (std {selection['std']:.3f})")
    ax.axvline(selection["quantiles"]["0.5"], color="k", linestyle="--",
               label=f"median {selection['quantiles']['0.5']:.3f}")
    ax.set_xlabel("selection rate (share of non-zero z_K)")
    ax.set_ylabel("test samples")
    ax.set_title(f"APEM dynamic selector, seed {selection['seed']} (Fig 7a)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "selection_rate.png"), dpi=110)
    plt.close(fig)
    written.append("selection_rate.png")
    pca = selection.get("pca")
    if pca:
        fig, ax = plt.subplots(figsize=(6, 5))
        for (group, entry), color in zip(pca["groups"].items(), ("tab:blue", "tab:gray", "tab:red")):
            points = np.asarray(entry["points"]).reshape(-1, 2)
            ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.6, color=color,
                       label=f"{group} {100 * pca['share']:.0f}% (mean rate {entry['mean_rate']:.3f})")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title("APEM sample representations by selection rate (Fig 7b)")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "selection_pca.png"), dpi=110)
        plt.close(fig)
        written.append("selection_pca.png")
    return written


def write_plots(report: dict[str, Any], out_dir: str) -> list[str]:
    """PNG plots from a report (so they can be redrawn from report.json): AUC, efficiency, selection rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, models = report["labels"], report["models"]
    names = [n for n, e in models.items() if e["seeds_ok"]]
    written: list[str] = []
    if names:
        fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4.5), squeeze=False)
        oracle = (report.get("oracle_auc") or {}).get("tasks", {})
        for ax, label in zip(axes[0], labels):
            means = [models[n]["auc_mean"][label] for n in names]
            stds = [models[n]["auc_std"][label] or 0.0 for n in names]
            ax.bar(range(len(names)), means, yerr=np.nan_to_num(stds), capsize=3,
                   color=["tab:red" if n == REFERENCE_MODEL else "tab:blue" for n in names])
            if oracle.get(label):
                ax.axhline(oracle[label], color="k", linestyle="--", label="oracle")
                ax.legend(loc="lower right")
            finite = [m for m in means if m is not None and math.isfinite(m)]
            if finite:
                ax.set_ylim(max(0.0, min(finite) - 0.02), min(1.0, max(finite + [oracle.get(label) or 0]) + 0.01))
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
            ax.set_title(f"{label}: test AUC (mean ± std)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "auc_comparison.png"), dpi=110)
        plt.close(fig)
        written.append("auc_comparison.png")

        panels = [("seconds_per_epoch", "training s / epoch"), ("inference_seconds", "inference s (test)"),
                  ("parameters", "parameters"), ("model_bytes", "state_dict MB")]
        fig, axes = plt.subplots(1, len(panels), figsize=(20, 4.5))
        for ax, (key, title) in zip(axes, panels):
            values = [(models[n][key] or 0) / (1e6 if key == "model_bytes" else 1) for n in names]
            ax.bar(range(len(names)), values, color=["tab:red" if n == REFERENCE_MODEL else "tab:gray" for n in names])
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "efficiency.png"), dpi=110)
        plt.close(fig)
        written.append("efficiency.png")
    if report.get("selection_rate"):
        written += _plot_selection(report["selection_rate"], out_dir, plt)
    return written


def _read_splits(train_dir: str, val_dir: str, test_dir: str, max_rows: int | None):
    """The three splits (the first ``max_rows`` rows of each), non-empty and of one spec."""
    train, val, test = (head_rows(read_dataset(p), max_rows) for p in (train_dir, val_dir, test_dir))
    for split, dataset in (("train", train), ("val", val), ("test", test)):
        if len(dataset) == 0:
            raise ValueError(f"{split} dataset {dataset.path} has no rows")
    check_same_spec(train.spec, val.spec, f"{val_dir} (validation) vs {train_dir} (training)")
    check_same_spec(train.spec, test.spec, f"{test_dir} (test) vs {train_dir} (training)")
    return train, val, test


def attainable_reference(oracle_dir: str, train_dir: str, train, test, oracle_table) -> dict[str, Any] | None:
    """The "generator known, user vectors estimated" AUCs on the test rows, estimated from the same
    training rows the models see; None unless the oracle's directory records its generator."""
    record = read_generator(oracle_dir)
    id_column = train.spec.id_column
    if record is None or not id_column:
        return None
    return attainable_aucs(record, train.table.column(id_column).to_numpy(), train.labels(),
                           test.table.column(id_column).to_numpy(), test.labels(), list(test.spec.labels),
                           oracle_table=oracle_table, negative_rate=negative_rate_beside(train_dir))


def run_experiment(train_dir: str, val_dir: str, test_dir: str, out_dir: str, config: ExperimentConfig,
                   oracle_dir: str | None = None, log: Callable[[str], None] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate ``config.models`` x ``config.seeds`` on one split; write report.json, report.md, plots
    into ``out_dir`` (only an earlier report, or anything with ``overwrite``, is replaced)."""
    import torch
    from tqdm.auto import tqdm

    claim_output(out_dir, EXPERIMENT_DIR, inputs=(train_dir, val_dir, test_dir), overwrite=overwrite)
    models = resolve_model_names(config.models)
    if config.seeds < 1 or config.epochs < 1:
        raise ValueError("--seeds and --epochs must be at least 1")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    train, val, test = _read_splits(train_dir, val_dir, test_dir, config.max_rows)
    labels = list(train.spec.labels)
    encoded: dict[str, dict] = {}

    def data_for(name: str) -> dict:
        """The splits encoded with this model's numerical encoding (tuned, else the experiment's)."""
        encoding = config.tuned.get(name, {}).get("numerical_encoding", config.numerical_encoding)
        if encoding not in encoded:
            encoder = FeatureEncoder(train.spec, numerical_encoding=encoding).fit(train)
            encoded[encoding] = {"fields": encoder.fields, "labels": labels, "encoding": encoding,
                                 **{k: encode_dataset(d, encoder) for k, d in (("train", train), ("val", val),
                                                                               ("test", test))}}
        return encoded[encoding]
    oracle_table = read_oracle(oracle_dir or test_dir)
    oracle = oracle_aucs(test, oracle_table, test.labels())
    attainable = attainable_reference(oracle_dir or test_dir, train_dir, train, test, oracle_table)

    os.makedirs(out_dir, exist_ok=True)
    header = {"config": {**asdict(config), "models": models, "train": train_dir, "val": val_dir, "test": test_dir,
                         "rows": {"train": len(train), "val": len(val), "test": len(test)}},
              "labels": labels, "oracle_auc": oracle, "attainable_auc": attainable}
    runs: list[dict] = []
    selection: dict[str, Any] | None = None
    # seed-major, so an interrupted grid still has every model on its first seeds
    grid = [(name, seed) for seed in range(config.seeds) for name in models]
    bar = tqdm(grid, desc="experiment", unit="run", disable=not config.progress)
    write = log or bar.write
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        try:
            data = data_for(name)
            record, model = _train_one(name, seed, data, config)
            if name == REFERENCE_MODEL and selection is None and hasattr(model, "selection_rates"):
                selection = {"seed": seed, **selection_rate_summary(model, data["test"].x, config.selection_rate_bins),
                             "pca": selection_pca(model, data["test"].x, seed)}
            write(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["auc"].items())
                  + f" ({record['seconds_per_epoch']:.1f} s/epoch)")
        except Exception as err:  # one model's failure is reported; the grid goes on
            record = {"model": name, "seed": seed, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=6)}
            write(f"{name} seed {seed}: FAILED {record['error']}")
        runs.append(record)
        write_report(out_dir, header, runs, selection, plots=False)  # partial results survive a kill
    bar.close()
    return write_report(out_dir, header, runs, selection, plots=True)


def write_report(out_dir: str, header: dict[str, Any], runs: list[dict], selection: dict[str, Any] | None,
                 plots: bool) -> dict[str, Any]:
    """Summarise the runs so far into report.json and report.md (and the PNG plots when ``plots``)."""
    report: dict[str, Any] = {**header, "completed_runs": len(runs),
                              "models": summarize(runs, header["labels"], header["config"]["models"],
                                                  header["oracle_auc"], header.get("attainable_auc")),
                              "selection_rate": selection, "runs": runs}
    report["plots"] = write_plots(report, out_dir) if plots else []
    report = _nan_to_none(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    return report
