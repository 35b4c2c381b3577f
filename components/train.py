"""train: fit a multi-task model on the train split, early-stopped on val; logs to MLflow."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def train(
    splits: Input[Dataset],
    model_name: str,
    model_params: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    mlflow_tracking_uri: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train ``model_name`` (a name of ``apem.models.registry``) with ``model_params`` (a JSON
    object of config overrides, e.g. ``{"embed_dim": 18}``) on ``splits/train``, early stopping
    on ``splits/val``. Five keys of ``model_params`` configure features and training instead of
    the model: ``numerical_encoding`` (log_round | dense_log | quantile:N, saved with the model),
    ``embedding_l2`` and ``embedding_l2_fields`` (per-field embedding weight decay, default off),
    ``data_loading`` (auto | memory | streaming: stream Parquet row groups through a bounded
    shuffle buffer; auto streams from 2M training rows) and ``loader_workers`` (DataLoader processes). Uses CUDA when the pod has a GPU (the pipeline requests one) and the CPU
    otherwise. The training negative rate comes from ``splits/split.json`` and is saved with the
    model for recalibration. Logs to MLflow when ``mlflow_tracking_uri`` is set.
    """
    import json
    import os

    from apem.data.atomic import scratch_dir
    from apem.data.split_record import negative_rate_of_split
    from apem.train.from_dirs import split_training_params, train_from_dirs
    from apem.train.trainer import TrainConfig

    try:
        overrides = json.loads(model_params or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"model_params is not a JSON object: {err}: {model_params!r}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"model_params must be a JSON object, got {model_params!r}")
    overrides, training = split_training_params(overrides)
    numerical_encoding = training.pop("numerical_encoding", "log_round")
    negative_rate = negative_rate_of_split(splits.path)
    if mlflow_tracking_uri:
        from apem.release.mlflow_registry import ensure_experiment, tracking

        with tracking(mlflow_tracking_uri) as client:  # a local store keeps artifacts beside itself
            ensure_experiment(client, TrainConfig.mlflow_experiment, mlflow_tracking_uri)
    # checkpoints only serve a resume within this task; the model artifact is the output
    # (removed on exit, and, left by a task killed here, by the next train on this machine: atomic.scratch_dir)
    with scratch_dir("apem-checkpoints") as checkpoints:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device="auto",
                             progress=False, mlflow_tracking_uri=mlflow_tracking_uri or None,
                             checkpoint_dir=checkpoints, **training)
        summary = train_from_dirs(os.path.join(splits.path, "train"), os.path.join(splits.path, "val"),
                                  model.path, model_name=model_name, model_overrides=overrides, config=config,
                                  negative_rate=negative_rate, numerical_encoding=numerical_encoding)
    model.metadata.update({"model_name": model_name, "negative_rate": negative_rate, "epochs": epochs,
                           "data_loading": summary["data_loading"],
                           "numerical_encoding": numerical_encoding, "mlflow_run_id": summary["mlflow_run_id"] or ""})
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    print(json.dumps(summary, default=str))
