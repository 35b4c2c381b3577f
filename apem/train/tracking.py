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


def log_epoch(record: dict, epoch: int) -> None:
    import mlflow

    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
    for i, value in enumerate(record.get("val_auc", [])):
        metrics[f"val_auc_{i}"] = value
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=epoch)


def log_result(best_val_auc: float, best_epoch: int) -> None:
    import mlflow

    mlflow.log_metric("best_val_auc_mean", best_val_auc)
    mlflow.log_metric("best_epoch", best_epoch)


def log_model_dir_and_end(model_dir: str) -> None:
    import mlflow

    mlflow.log_artifacts(model_dir, artifact_path="model")
    mlflow.end_run()
