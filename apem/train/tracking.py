"""MLflow tracking of a training run: params, per-epoch metrics, the result and the model directory."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np


def start_run(tracking_uri: str, experiment: str, train_params: dict, model) -> object:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    run = mlflow.active_run() or mlflow.start_run()
    params = {f"train.{k}": v for k, v in train_params.items()}
    params.update({f"model.{k}": v for k, v in asdict(model.config).items()})
    params.update({f"loss.{k}": v for k, v in asdict(model.loss_config).items()})
    params["model.name"] = model.registry_name
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return run


def task_metric_names(prefix: str, values: list, task_names: list[str] | None) -> dict:
    """``{prefix}_{task}`` per value (``val_auc_click``); by position only when the names are unknown."""
    names = list(task_names) if task_names and len(task_names) == len(values) else [str(i) for i in range(len(values))]
    return {f"{prefix}_{name}": value for name, value in zip(names, values)}


def log_epoch(record: dict, epoch: int, task_names: list[str] | None = None) -> None:
    import mlflow

    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
    metrics.update(task_metric_names("val_auc", record.get("val_auc", []), task_names))
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=epoch)


def log_result(best_val_auc: float, best_epoch: int) -> None:
    import mlflow

    mlflow.log_metric("best_val_auc_mean", best_val_auc)
    mlflow.log_metric("best_epoch", best_epoch)


def log_model_dir_and_end(model_dir: str) -> str:
    """Log the model directory, end the run, and return its id (push registers the model into it)."""
    import mlflow

    mlflow.log_artifacts(model_dir, artifact_path="model_dir")
    run_id = mlflow.active_run().info.run_id
    mlflow.end_run()
    return run_id
