"""``apem tune``: a fair, budgeted hyperparameter search on the validation split only (paper 4.1.4).

Every model gets the same budget: the same number of trials, the same seeded Optuna TPE sampler,
the same training rows and epochs. A trial trains on the training split and scores the mean
validation AUC over tasks at its best epoch; the test split is never read. The space, for every
model: ``lr`` (log-uniform), ``embedding_l2`` (per-row weight decay, all fields) and
``numerical_encoding``; plus the model's own knobs, found by its config's field names so no model
list is spelled out here: APEM's K (``inducing_points``) and L (``layers``), MMoE's ``n_experts``,
PLE's ``n_specific_experts`` / ``n_shared_experts``.

The result is one JSON (:data:`TUNE_FORMAT`) that ``apem experiment --tuned FILE`` reads; with a
tracking URI each model is an MLflow run with one nested run per trial.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields as dataclass_fields
from typing import Any, Callable

import numpy as np

from apem.data.atomic import write_text_atomic
from apem.data.encoding import FeatureEncoder, parse_numerical_encoding
from apem.data.spec import check_same_spec, read_dataset
from apem.models import build_model
from apem.models.registry import resolve_configs
from apem.research.experiment import head_rows
from apem.train.trainer import TrainConfig, encode_dataset, fit, set_seed

TUNE_FORMAT = "apem-tune/1"
LR_RANGE = (3e-4, 3e-3)
# measured: 1e-3 on user_id rows left 100k-row Shared-Bottom curves unchanged to 4 decimals, so the range
# reaches 1e-1 (docs/results/issue10-300k)
EMBEDDING_L2_CHOICES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
# a model's own knobs, by the name of its config field
MODEL_KNOBS = {"inducing_points": (16, 32, 64), "layers": (1, 2, 4), "n_experts": (2, 4, 8),
               "n_specific_experts": (1, 2), "n_shared_experts": (1, 2)}
TRAINING_KEYS = ("lr", "embedding_l2", "numerical_encoding")


@dataclass
class TuneConfig:
    models: list[str]
    trials: int = 8  # per model: the budget every model gets
    epochs: int = 2
    patience: int = 1
    batch_size: int = 1024
    seed: int = 0
    max_rows: int | None = None
    encodings: tuple[str, ...] = ("log_round", "dense_log", "quantile:32")
    device: str = "auto"
    num_threads: int | None = None
    mlflow_tracking_uri: str | None = None


def search_space(model_name: str, encodings: tuple[str, ...]) -> dict[str, tuple]:
    """The knobs tuned for ``model_name``: name -> ("log", low, high) or ("choice", options)."""
    config, _ = resolve_configs(model_name)
    space: dict[str, tuple] = {"lr": ("log", *LR_RANGE), "embedding_l2": ("choice", EMBEDDING_L2_CHOICES),
                               "numerical_encoding": ("choice", tuple(encodings))}
    own = {f.name for f in dataclass_fields(config)}
    for knob, options in MODEL_KNOBS.items():
        if knob in own:
            space[knob] = ("choice", options)
    return space


def _suggest(trial, space: dict[str, tuple]) -> dict[str, Any]:
    return {name: trial.suggest_float(name, spec[1], spec[2], log=True) if spec[0] == "log"
            else trial.suggest_categorical(name, list(spec[1])) for name, spec in space.items()}


class EncodedSplits:
    """Train and validation encoded once per numerical encoding (the encoder is fitted on train)."""

    def __init__(self, train_dir: str, val_dir: str, max_rows: int | None) -> None:
        self.train, self.val = (read_dataset(p) for p in (train_dir, val_dir))
        check_same_spec(self.train.spec, self.val.spec, f"{val_dir} (validation) vs {train_dir} (training)")
        if max_rows:
            self.train, self.val = (head_rows(d, max_rows) for d in (self.train, self.val))
        self._cache: dict[str, tuple] = {}

    def get(self, encoding: str):
        if encoding not in self._cache:
            encoder = FeatureEncoder(self.train.spec, numerical_encoding=encoding).fit(self.train)
            self._cache[encoding] = (encoder.fields, encode_dataset(self.train, encoder),
                                     encode_dataset(self.val, encoder))
        return self._cache[encoding]


def fit_on_validation(name: str, splits: EncodedSplits, params: dict[str, Any], train_config: TrainConfig):
    """Build ``name`` with the model knobs among ``params`` (the training keys are left out), train it
    on the training split with early stopping on validation, seeded with ``train_config.seed``;
    return (model, TrainResult). The data is encoded with ``params["numerical_encoding"]``."""
    fields, train, val = splits.get(params["numerical_encoding"])
    set_seed(train_config.seed)
    model = build_model(name, fields, train.y.shape[1],
                        {k: v for k, v in params.items() if k not in TRAINING_KEYS} or None)
    return model, fit(model, train, val, train_config)


def _objective(name: str, splits: EncodedSplits, config: TuneConfig, log_trial: Callable):
    def run_trial(trial) -> float:
        params = _suggest(trial, search_space(name, config.encodings))
        started = time.perf_counter()
        _, result = fit_on_validation(name, splits, params, TrainConfig(
            epochs=config.epochs, patience=config.patience, batch_size=config.batch_size, lr=params["lr"],
            seed=config.seed, device=config.device, num_threads=config.num_threads, progress=False,
            embedding_l2=params["embedding_l2"]))
        score = float(result.best_val_auc) if np.isfinite(result.best_val_auc) else 0.0
        log_trial(name, trial.number, params, score, time.perf_counter() - started, result.best_epoch)
        return score
    return run_trial


def tune_model(name: str, splits: EncodedSplits, config: TuneConfig, log: Callable[[str], None]) -> dict:
    """``config.trials`` trials for one model; its best parameters and every trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials: list[dict] = []

    def log_trial(model, number, params, score, seconds, best_epoch):
        trials.append({"number": number, "params": params, "val_auc_mean": score, "seconds": seconds,
                       "best_epoch": best_epoch})
        log(f"{model} trial {number}: val AUC {score:.4f} {params} ({seconds:.0f} s)")
        _track_trial(config.mlflow_tracking_uri, model, trials[-1])

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    with _tracked_model_run(config.mlflow_tracking_uri, name, config):
        study.optimize(_objective(name, splits, config, log_trial), n_trials=config.trials)
    return {"best": dict(study.best_params), "best_val_auc_mean": float(study.best_value),
            "space": {k: list(v) for k, v in search_space(name, config.encodings).items()}, "trials": trials}


def _tracked_model_run(uri: str | None, name: str, config: TuneConfig):
    import contextlib

    if not uri:
        return contextlib.nullcontext()
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("apem-tune")
    run = mlflow.start_run(run_name=f"tune-{name}")
    mlflow.log_params({"model": name, "trials": config.trials, "epochs": config.epochs, "seed": config.seed,
                       "max_rows": config.max_rows})
    return run


def _track_trial(uri: str | None, name: str, trial: dict) -> None:
    if not uri:
        return
    import mlflow

    with mlflow.start_run(run_name=f"{name}-trial-{trial['number']}", nested=True):
        mlflow.log_params({k: str(v) for k, v in trial["params"].items()})
        mlflow.log_metrics({"val_auc_mean": trial["val_auc_mean"], "seconds": trial["seconds"]})


def run_tuning(train_dir: str, val_dir: str, out_path: str, config: TuneConfig,
               log: Callable[[str], None] = print) -> dict:
    """Tune every model of ``config`` with the same budget; write the chosen parameters to ``out_path``."""
    if config.trials < 1 or config.epochs < 1:
        raise ValueError("--trials and --epochs must be at least 1")
    for encoding in config.encodings:
        parse_numerical_encoding(encoding)
    check_replaceable(out_path)
    splits = EncodedSplits(train_dir, val_dir, config.max_rows)
    started = time.perf_counter()
    models = {name: tune_model(name, splits, config, log) for name in config.models}
    result = {"format": TUNE_FORMAT, "config": asdict(config),
              "data": {"train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir),
                       "rows": {"train": len(splits.train), "val": len(splits.val)}},
              "budget": {"trials_per_model": config.trials, "epochs_per_trial": config.epochs,
                         "wall_seconds": time.perf_counter() - started},
              "models": models}
    write_text_atomic(out_path, json.dumps(result, indent=2))
    return result


def check_replaceable(out_path: str) -> None:
    """Refuse to overwrite a file that is not an earlier ``apem tune`` output (nothing a user had is lost)."""
    if not os.path.exists(out_path):
        return
    try:
        with open(out_path) as fh:
            ours = json.load(fh).get("format") == TUNE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{out_path} exists and is not an `apem tune` result; choose another --out")


def read_tuned(path: str, models: list[str]) -> dict[str, dict[str, Any]]:
    """The chosen parameters per model from an ``apem tune`` JSON (models it lacks keep the defaults)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as an `apem tune` result ({err})") from None
    if not isinstance(data, dict) or data.get("format") != TUNE_FORMAT:
        raise ValueError(f"{path}: not an `apem tune` result (format {TUNE_FORMAT!r} expected)")
    return {name: dict(entry["best"]) for name, entry in data.get("models", {}).items() if name in models}
