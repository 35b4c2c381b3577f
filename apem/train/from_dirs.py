"""Training from dataset directories: read, fit the encoder, train a registry model, save its directory."""

from __future__ import annotations

import os
from dataclasses import replace

from apem.data.encoding import DEFAULT_NUMERICAL_ENCODING, FeatureEncoder, parse_numerical_encoding
from apem.data.ownership import MODEL_DIR, claim_output
from apem.data.spec import check_same_spec, read_dataset
from apem.data.streaming import fit_encoder_streaming, list_units, read_spec
from apem.data.split_record import check_negative_rate, negative_rate_beside
from apem.inference.model_dir import save_model
from apem.models import build_model
from apem.train import tracking
from apem.train.checkpoint import json_hash, remove_checkpoint
from apem.train.streaming import EncodeRows, StreamingData
from apem.train.trainer import TrainConfig, TrainingData, encode_dataset, fit, set_seed


# Keys of a ``model_params`` JSON object (the KFP train component's) that configure features and
# training rather than the model: popped before the rest goes to the model config.
TRAINING_PARAM_KEYS = ("numerical_encoding", "embedding_l2", "embedding_l2_fields", "data_loading",
                       "loader_workers", "precision")
# ``data_loading="auto"`` streams a training set of at least this many rows and keeps smaller ones
# in memory. benchmarks/bench_streaming.py (README): on the CPU streaming trains at the in-memory
# rate and its peak memory is flat, while in-memory grows (652 MB at 1M rows, 1.2 GB at 3M). Below
# 2M rows in-memory costs at most ~1 GB and skips the per-epoch re-encode (one reader encodes
# ~190k rows/s, slower than a GPU trains), so small sets stay in memory.
AUTO_STREAMING_ROWS = 2_000_000


def choose_data_loading(data_loading: str, train_rows: int) -> str:
    """``memory`` or ``streaming``: the choice given, or for ``auto`` by :data:`AUTO_STREAMING_ROWS`."""
    if data_loading != "auto":
        return data_loading
    return "streaming" if train_rows >= AUTO_STREAMING_ROWS else "memory"


def load_training_data(train_dir: str, val_dir: str, config: TrainConfig, numerical_encoding: str
                       ) -> tuple[FeatureEncoder, TrainingData, TrainingData, str]:
    """Fit the encoder on train and return (encoder, train, val, mode): both sets encoded in memory,
    or both streamed (:class:`apem.train.streaming.StreamingData`; the encoder fitted in a
    streaming pass, validation scored chunk by chunk), as ``config.data_loading`` decides."""
    spec, val_spec = read_spec(train_dir), read_spec(val_dir)
    check_same_spec(spec, val_spec, f"{val_dir} (validation) vs {train_dir} (training)")
    units = list_units(train_dir, spec)
    mode = choose_data_loading(config.data_loading, sum(u.rows for u in units))
    encoder = FeatureEncoder(spec, numerical_encoding=numerical_encoding)
    if mode == "streaming":
        rows = fit_encoder_streaming(train_dir, encoder, units=units)
        train = StreamingData(train_dir, spec, EncodeRows(encoder), rows=rows, workers=config.loader_workers,
                              units=units)
        return encoder, train, StreamingData(val_dir, val_spec, EncodeRows(encoder)), mode
    train_ds, val_ds = read_dataset(train_dir), read_dataset(val_dir)
    encoder.fit(train_ds)
    return encoder, encode_dataset(train_ds, encoder), encode_dataset(val_ds, encoder), mode


def split_training_params(params: dict) -> tuple[dict, dict]:
    """``model_params`` -> (model config overrides, {numerical_encoding, embedding_l2, embedding_l2_fields}).

    One JSON object configures a whole run from a pipeline parameter, e.g.
    ``{"embed_dim": 18, "numerical_encoding": "dense_log", "embedding_l2_fields": {"user_id": 1e-3}}``.
    """
    model_overrides = {k: v for k, v in params.items() if k not in TRAINING_PARAM_KEYS}
    training = {k: params[k] for k in TRAINING_PARAM_KEYS if k in params}
    parse_numerical_encoding(training.get("numerical_encoding", DEFAULT_NUMERICAL_ENCODING))
    TrainConfig(**{k: v for k, v in training.items() if k != "numerical_encoding"})  # bad values fail here
    if not isinstance(training.get("embedding_l2_fields", {}), dict):
        raise ValueError(f"embedding_l2_fields must map field names to numbers, got {training['embedding_l2_fields']!r}")
    return model_overrides, training


def train_from_dirs(train_dir: str, val_dir: str, out_dir: str, model_name: str = "apem",
                    model_overrides: dict | None = None, loss_overrides: dict | None = None,
                    config: TrainConfig | None = None, negative_rate: float | None = None,
                    numerical_encoding: str = DEFAULT_NUMERICAL_ENCODING, overwrite: bool = False) -> dict:
    """Read datasets, fit features on train, train a registry model, save it to ``out_dir``.

    ``numerical_encoding`` (log_round | dense_log | quantile:N, :mod:`apem.data.encoding`) is fitted
    on train and saved in the model's ``features.json``, so predict and serving reuse it.

    ``negative_rate`` (None: read from ``<train_dir>/../split.json``, else 1.0) is stored with the
    model so predictions are recalibrated to the entire space (:func:`apem.inference.calibration.recalibrate`).
    Checkpoints go to ``<out_dir>.checkpoints`` unless ``config.checkpoint_dir`` is set; they are removed
    once the model is saved.
    ``out_dir`` is claimed before any work (:func:`apem.data.ownership.claim_output`): only an earlier
    model directory is replaced, unless ``overwrite``. Returns a JSON-able summary.
    """
    claim_output(out_dir, MODEL_DIR, inputs=(train_dir, val_dir), overwrite=overwrite)
    config = config or TrainConfig()
    parse_numerical_encoding(numerical_encoding)  # a bad option fails before any data is read
    if config.checkpoint_dir is None:
        config = replace(config, checkpoint_dir=os.path.abspath(out_dir) + ".checkpoints")
    negative_rate = check_negative_rate(negative_rate_beside(train_dir) if negative_rate is None else negative_rate)
    encoder, train, val, data_loading = load_training_data(train_dir, val_dir, config, numerical_encoding)
    spec = encoder.spec
    set_seed(config.seed)
    model = build_model(model_name, encoder.fields, len(spec.labels), model_overrides, loss_overrides)
    result = fit(model, train, val, config, encoder_hash=json_hash(encoder.to_dict()),
                 task_names=list(spec.labels))
    meta = {"negative_rate": negative_rate, "train_rows": len(train), "val_rows": len(val),
            "train_dir": os.path.abspath(train_dir), "val_dir": os.path.abspath(val_dir),
            "best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc,
            "numerical_encoding": numerical_encoding, "data_loading": data_loading,
            "train_config": config.loggable()}
    model_dir = save_model(out_dir, model.cpu(), encoder, spec, extra_meta=meta,
                           overwrite=overwrite)
    remove_checkpoint(config.checkpoint_dir)  # saved: nothing left to resume, nothing to mistake for another run's
    run_id = tracking.log_model_dir_and_end(model_dir) if config.mlflow_tracking_uri else None
    best = next((r for r in result.history if r.get("epoch") == result.best_epoch), {})
    return {"model_dir": model_dir, "model": model_name, "negative_rate": negative_rate,
            "numerical_encoding": numerical_encoding, "data_loading": data_loading,
            "train_rows": len(train), "val_rows": len(val), "mlflow_run_id": run_id, **result.to_dict(),
            **tracking.task_metric_names("best_val_auc", best.get("val_auc", []), list(spec.labels))}
