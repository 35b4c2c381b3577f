"""The K / L sensitivity study behind ``apem sensitivity`` (issue 10: defaults change only on evidence).

APEM (or an ablation that shares its knobs) is trained for every (K, L) cell of a grid, K the
inducing points (``inducing_points``) and L the layers (``layers``), over seeds 0..N-1, with the
training machinery of ``apem tune`` (:func:`apem.research.tuning.fit_on_validation`): the same
encoded splits, the same trainer, early stopping on validation. Only the validation split is
scored; the test split is never read. Each cell reports validation AUC per task at the best epoch
(mean and std over seeds), training seconds per epoch and the parameter count, so accuracy and cost
sit side by side. Output: ``sensitivity.json`` and ``sensitivity.md``, rewritten after every run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from typing import Any, Callable

import numpy as np

from apem.data.atomic import write_text_atomic
from apem.data.encoding import parse_numerical_encoding
from apem.data.ownership import SENSITIVITY_DIR, claim_output
from apem.models.registry import resolve_configs
from apem.eval.comparison import format_cell
from apem.research.experiment import parameter_count, resolve_model_names
from apem.research.tuning import EncodedSplits, fit_on_validation
from apem.train.trainer import TrainConfig

SENSITIVITY_FORMAT = "apem-sensitivity/1"
K_KNOB, L_KNOB = "inducing_points", "layers"


@dataclass
class SensitivityConfig:
    model: str = "apem"
    inducing_points: tuple[int, ...] = (16, 32, 64)
    layers: tuple[int, ...] = (1, 2, 4)
    seeds: int = 3
    epochs: int = 2
    patience: int = 1
    batch_size: int = 1024
    lr: float = 1e-3
    max_rows: int | None = None
    numerical_encoding: str = "log_round"
    embedding_l2: float = 0.0
    embedding_l2_fields: dict[str, float] = field(default_factory=dict)
    device: str = "auto"
    num_threads: int | None = None
    # the model's hyperparameters chosen by `apem tune` (lr, embedding_l2, numerical_encoding, other
    # knobs): every cell trains with them, except for K and L, which the grid sets
    tuned: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError (one line) on a config that cannot run."""
        resolve_model_names([self.model])
        own = {f.name for f in dataclass_fields(resolve_configs(self.model)[0])}
        if not {K_KNOB, L_KNOB} <= own:
            raise ValueError(f"model {self.model!r} has no K ({K_KNOB}) and L ({L_KNOB}) to vary")
        for flag, values in (("--k", self.inducing_points), ("--l", self.layers)):
            if not values or min(values) < 1 or len(set(values)) != len(values):
                raise ValueError(f"{flag} needs distinct values >= 1, got {list(values)}")
        for flag, value in (("--seeds", self.seeds), ("--epochs", self.epochs), ("--patience", self.patience),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        parse_numerical_encoding(self.tuned.get("numerical_encoding", self.numerical_encoding))


def _run_cell(k: int, l: int, seed: int, splits: EncodedSplits, config: SensitivityConfig) -> dict[str, Any]:
    """One (K, L, seed) training run, scored on validation at its best epoch."""
    params = {"numerical_encoding": config.numerical_encoding, "lr": config.lr, "embedding_l2": config.embedding_l2,
              **config.tuned, K_KNOB: k, L_KNOB: l}
    model, result = fit_on_validation(config.model, splits, params, TrainConfig(
        epochs=config.epochs, patience=config.patience, batch_size=config.batch_size, lr=params["lr"], seed=seed,
        device=config.device, num_threads=config.num_threads, progress=False, embedding_l2=params["embedding_l2"],
        embedding_l2_fields=config.embedding_l2_fields))
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return {"k": k, "l": l, "seed": seed, "val_auc": dict(zip(splits.train.spec.labels, best.get("val_auc", []))),
            "val_auc_mean": float(result.best_val_auc), "best_epoch": result.best_epoch,
            "epochs_run": len(result.history), "seconds_per_epoch": float(result.seconds_per_epoch),
            "parameters": parameter_count(model), "hyperparameters": params}


def summarize_cells(runs: list[dict], labels: list[str], config: SensitivityConfig) -> list[dict[str, Any]]:
    """One entry per (K, L) cell in grid order: AUC mean and std per task over seeds, s/epoch, parameters."""
    cells = []
    for k in config.inducing_points:
        for l in config.layers:
            done = [r for r in runs if r["k"] == k and r["l"] == l]
            aucs = {label: [r["val_auc"].get(label, float("nan")) for r in done] for label in labels}
            means = [r["val_auc_mean"] for r in done]
            cells.append({
                "k": k, "l": l, "seeds_done": [r["seed"] for r in done],
                "val_auc_mean": {t: float(np.mean(v)) if v else None for t, v in aucs.items()},
                "val_auc_std": {t: float(np.std(v, ddof=1)) if len(v) > 1 else None for t, v in aucs.items()},
                "val_auc_task_mean": float(np.mean(means)) if means else None,
                "val_auc_task_mean_std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
                "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in done])) if done else None,
                "parameters": done[0]["parameters"] if done else None})
    return cells


def _settings(cfg: dict[str, Any]) -> str:
    """The training settings every cell shares, tuned ones marked."""
    tuned = {k: v for k, v in cfg.get("tuned", {}).items() if k not in (K_KNOB, L_KNOB)}
    plain = {"lr": cfg["lr"], "embedding_l2": cfg["embedding_l2"], "numerical_encoding": cfg["numerical_encoding"]}
    text = ", ".join(f"{k} {v}" for k, v in plain.items() if k not in tuned)
    return text + ("; from apem tune: " + ", ".join(f"{k} {v}" for k, v in tuned.items()) if tuned else "")


def render_markdown(result: dict[str, Any]) -> str:
    cfg, labels, cells = result["config"], result["labels"], result["cells"]
    rows = result["data"]["rows"]
    lines = [f"# {cfg['model']} sensitivity to K (inducing points) and L (layers)", "",
             f"Validation AUC at the best epoch (early stopping on validation; test never read), mean ± std over "
             f"seeds 0..{cfg['seeds'] - 1}; train {rows['train']} rows, val {rows['val']}; up to {cfg['epochs']} "
             f"epochs (patience {cfg['patience']}), batch {cfg['batch_size']}; "
             f"{_settings(cfg)}. Completed runs: {result['completed_runs']} of {len(cells) * cfg['seeds']}.", ""]
    header = ["K", "L"] + [f"{l} val AUC" for l in labels] + ["mean val AUC", "s/epoch", "params", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        row = [str(c["k"]), str(c["l"])]
        row += [f"{format_cell(c['val_auc_mean'][l])} ± {format_cell(c['val_auc_std'][l])}" for l in labels]
        row += [f"{format_cell(c['val_auc_task_mean'])} ± {format_cell(c['val_auc_task_mean_std'])}",
                format_cell(c["seconds_per_epoch"], ".2f"), str(c["parameters"] or "–"), str(len(c["seeds_done"]))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Mean validation AUC over tasks (rows K, columns L):", "",
              "| K \\ L | " + " | ".join(str(l) for l in cfg["layers"]) + " |",
              "|" + "---|" * (len(cfg["layers"]) + 1)]
    for k in cfg["inducing_points"]:
        lines.append(f"| {k} | " + " | ".join(format_cell(c["val_auc_task_mean"]) for c in cells if c["k"] == k) + " |")
    return "\n".join(lines) + "\n"


def _write(out_dir: str, header: dict[str, Any], runs: list[dict], config: SensitivityConfig) -> dict[str, Any]:
    result = {**header, "completed_runs": len(runs), "cells": summarize_cells(runs, header["labels"], config),
              "runs": runs}
    write_text_atomic(os.path.join(out_dir, "sensitivity.json"), json.dumps(result, indent=2))
    write_text_atomic(os.path.join(out_dir, "sensitivity.md"), render_markdown(result))
    return result


def run_sensitivity(train_dir: str, val_dir: str, out_dir: str, config: SensitivityConfig,
                    log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Every (K, L) cell x seed on train, scored on validation; write sensitivity.json and .md into
    ``out_dir`` (only an earlier sensitivity study, or anything with ``overwrite``, is replaced)."""
    config.check()
    claim_output(out_dir, SENSITIVITY_DIR, inputs=(train_dir, val_dir), overwrite=overwrite)
    started = time.perf_counter()
    splits = EncodedSplits(train_dir, val_dir, config.max_rows)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise ValueError(f"{train_dir if len(splits.train) == 0 else val_dir}: dataset has no rows")
    os.makedirs(out_dir, exist_ok=True)
    header = {"format": SENSITIVITY_FORMAT, "config": asdict(config), "labels": list(splits.train.spec.labels),
              "data": {"train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir),
                       "rows": {"train": len(splits.train), "val": len(splits.val)}}}
    runs: list[dict] = []
    # seed-major, so an interrupted study still has every cell on its first seeds
    for seed in range(config.seeds):
        for k in config.inducing_points:
            for l in config.layers:
                runs.append(_run_cell(k, l, seed, splits, config))
                r = runs[-1]
                log(f"K={k} L={l} seed {seed}: val AUC {r['val_auc_mean']:.4f}, {r['seconds_per_epoch']:.1f} s/epoch, "
                    f"{r['parameters']} parameters")
                header["wall_seconds"] = time.perf_counter() - started
                result = _write(out_dir, header, runs, config)
    return result
