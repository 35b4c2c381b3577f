"""Training from dataset directories: read, fit the encoder, train a registry model, save its directory."""

from __future__ import annotations

import os
from dataclasses import replace

from apem.data.encoding import FeatureEncoder
from apem.data.spec import check_same_spec, read_dataset
from apem.data.split_record import check_negative_rate, negative_rate_beside
from apem.inference.model_dir import save_model
from apem.models import build_model
from apem.train import tracking
from apem.train.trainer import TrainConfig, encode_dataset, fit, set_seed


def train_from_dirs(train_dir: str, val_dir: str, out_dir: str, model_name: str = "apem",
                    model_overrides: dict | None = None, loss_overrides: dict | None = None,
                    config: TrainConfig | None = None, negative_rate: float | None = None) -> dict:
    """Read datasets, fit features on train, train a registry model, save it to ``out_dir``.

    ``negative_rate`` (None: read from ``<train_dir>/../split.json``, else 1.0) is stored with the
    model so predictions are recalibrated to the entire space (:func:`apem.inference.calibration.recalibrate`).
    Checkpoints go to ``<out_dir>.checkpoints`` unless ``config.checkpoint_dir`` is set.
    Returns a JSON-able summary.
    """
    config = config or TrainConfig()
    if config.checkpoint_dir is None:
        config = replace(config, checkpoint_dir=os.path.abspath(out_dir) + ".checkpoints")
    train_ds = read_dataset(train_dir)
    val_ds = read_dataset(val_dir)
    check_same_spec(train_ds.spec, val_ds.spec, f"{val_dir} (validation) vs {train_dir} (training)")
    negative_rate = check_negative_rate(negative_rate_beside(train_dir) if negative_rate is None else negative_rate)
    set_seed(config.seed)
    encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
    train, val = encode_dataset(train_ds, encoder), encode_dataset(val_ds, encoder)
    model = build_model(model_name, encoder.fields, len(train_ds.spec.labels), model_overrides, loss_overrides)
    result = fit(model, train, val, config, task_names=list(train_ds.spec.labels))
    meta = {"negative_rate": negative_rate, "train_rows": len(train), "val_rows": len(val),
            "train_dir": os.path.abspath(train_dir), "val_dir": os.path.abspath(val_dir),
            "best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc,
            "train_config": config.loggable()}
    model_dir = save_model(out_dir, model.cpu(), encoder, train_ds.spec, extra_meta=meta)
    run_id = tracking.log_model_dir_and_end(model_dir) if config.mlflow_tracking_uri else None
    best = next((r for r in result.history if r.get("epoch") == result.best_epoch), {})
    return {"model_dir": model_dir, "model": model_name, "negative_rate": negative_rate,
            "train_rows": len(train), "val_rows": len(val), "mlflow_run_id": run_id, **result.to_dict(),
            **tracking.task_metric_names("best_val_auc", best.get("val_auc", []), list(train_ds.spec.labels))}
