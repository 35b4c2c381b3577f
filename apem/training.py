"""The trainer: one loop for every model of the registry (it never branches on the model type).

Mini-batches are slices of pre-encoded tensors taken through one ``randperm`` per epoch; there is
no per-row Python in encoding or in the hot loop. Each epoch ends with a validation pass (early
stopping on the mean validation AUC over tasks) and a checkpoint that ``resume`` continues from
with the same result as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from apem.features import FeatureEncoder
from apem.metrics import auc
from apem.models.base import MultiTaskModel
from apem.spec import Dataset, DatasetError, read_dataset

CHECKPOINT_FILE = "checkpoint.pt"
SPLIT_FILE = "split.json"


@dataclass
class TrainConfig:
    """Adam with Table 2's batch 1024 and lr 1e-3. ``device``: auto (CUDA when present), cpu or cuda.
    ``checkpoint_dir``: where ``checkpoint.pt`` is written after every epoch; ``resume`` continues
    from it. ``mlflow_tracking_uri``: log params, per-epoch metrics (and, via
    :func:`train_from_dirs`, the model directory) to that MLflow server or store."""

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    patience: int = 2  # stop after this many epochs without a better mean validation AUC
    num_threads: int | None = None
    progress: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "apem"
    checkpoint_dir: str | None = None
    resume: bool = False


@dataclass
class EncodedData:
    x: torch.Tensor  # (n, F) int64 field indices
    y: torch.Tensor  # (n, N) float32 labels in funnel order

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class TrainResult:
    best_epoch: int
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def encode_dataset(dataset: Dataset, encoder: FeatureEncoder) -> EncodedData:
    """Encode a whole dataset once; the (n, F) indices are what the trainer slices batches from."""
    return EncodedData(x=torch.from_numpy(encoder.transform(dataset.table)),
                       y=torch.from_numpy(dataset.labels()))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


_MALLOC_TUNED = False


def keep_freed_memory_for_reuse() -> None:
    """Stop glibc from handing large freed blocks back to the OS after every step.

    glibc serves blocks over its mmap threshold (at most 32 MiB) with fresh mmaps and trims the heap
    top, so each training step re-faults APEM's (B, S, L M K) score buffers (32 MiB at batch 1024)
    page by page: measured ~25 ms per 32 MiB buffer on a 2-core VM, a quarter of APEM's step.
    Raising the mmap and trim thresholds keeps freed memory in the heap (RSS stays at the peak of
    one step). Process-wide, once; a no-op where libc is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def predict(model: MultiTaskModel, x: torch.Tensor, batch_size: int = 2048, device: str | torch.device = "cpu") -> np.ndarray:
    """(n, N) entire-space probabilities in eval mode. Batches of 2048 keep APEM's attention
    scores (L M K F floats per row) near 64 MB and in cache-friendlier pieces; larger batches only
    add memory (measured: 512-2048 rows per batch is fastest on CPU)."""
    device = torch.device(device)
    keep_freed_memory_for_reuse()
    was_training = model.training
    model.eval()
    parts = [model(x[i:i + batch_size].to(device, non_blocking=True)).probs.float().cpu()
             for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    n_tasks = model.n_tasks
    return torch.cat(parts).numpy() if parts else np.zeros((0, n_tasks), np.float32)


def validation_aucs(model: MultiTaskModel, data: EncodedData, device: torch.device) -> list[float]:
    probs = predict(model, data.x, device=device)
    labels = data.y.numpy()
    return [auc(labels[:, i], probs[:, i]) for i in range(labels.shape[1])]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): a resumed run shuffles exactly like an uninterrupted one.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def fit(model: MultiTaskModel, train: EncodedData, val: EncodedData | None, config: TrainConfig) -> "TrainResult":
    """Train ``model`` with Adam; return the history and leave the best-validation state loaded.

    The per-step contract is model-agnostic: ``set_training_progress(step)``, ``model(x)``,
    ``model.loss(output, y)``. Without ``val`` the last epoch is the best one.
    """
    if len(train) == 0:
        raise ValueError("training data has no rows")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    keep_freed_memory_for_reuse()
    set_seed(config.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict] = []
    start_epoch, step, best_auc, best_epoch, bad_epochs = 0, 0, -float("inf"), -1, 0
    best_state = None
    ckpt_path = os.path.join(config.checkpoint_dir, CHECKPOINT_FILE) if config.checkpoint_dir else None
    if config.resume and ckpt_path and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        best_auc, best_epoch, bad_epochs = float(ckpt["best_auc"]), int(ckpt["best_epoch"]), int(ckpt["bad_epochs"])
        best_state, history = ckpt["best_model"], json.loads(ckpt["history"])
        if bad_epochs >= max(config.patience, 1):
            start_epoch = config.epochs  # the interrupted run had already stopped early
    if config.checkpoint_dir:
        os.makedirs(config.checkpoint_dir, exist_ok=True)
    mlflow_run = _start_mlflow(config, model) if config.mlflow_tracking_uri else None
    n = len(train)
    x_all, y_all = train.x, train.y
    if device.type == "cuda":  # 140 bytes a row: even 10M rows sit on the GPU, so batches never cross PCIe
        x_all, y_all = x_all.to(device), y_all.to(device)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = torch.randperm(n, generator=_epoch_generator(config.seed, epoch)).to(x_all.device)
        started = time.perf_counter()
        loss_sum = 0.0
        parts_sum: dict[str, float] = {}
        batches = 0
        with _progress_bar(n, f"epoch {epoch + 1}/{config.epochs}", config.progress) as bar:
            for begin in range(0, n, config.batch_size):
                idx = order[begin:begin + config.batch_size]
                x = x_all.index_select(0, idx).to(device, non_blocking=True)
                y = y_all.index_select(0, idx).to(device, non_blocking=True)
                model.set_training_progress(step)
                loss, parts = model.loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                batches += 1
                loss_value = float(loss.detach())
                loss_sum += loss_value
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                if bar.disable is False:
                    elapsed = time.perf_counter() - started
                    bar.update(len(idx))
                    bar.set_postfix(loss=f"{loss_value:.4f}", rows_s=f"{(begin + len(idx)) / elapsed:,.0f}")
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "seconds": seconds, "samples_per_s": n / seconds,
                  **{f"train_{k}": v / batches for k, v in parts_sum.items()}, "train_loss": loss_sum / batches}
        if val is not None and len(val):
            aucs = validation_aucs(model, val, device)
            record["val_auc"] = aucs
            valid = [a for a in aucs if np.isfinite(a)]
            record["val_auc_mean"] = float(np.mean(valid)) if valid else float("nan")
        score = record.get("val_auc_mean", float(epoch))  # without validation the last epoch is best
        if np.isfinite(score) and score > best_auc:
            best_auc, best_epoch, bad_epochs = score, epoch, 0
            best_state = _cpu_state(model)
        else:
            bad_epochs += 1
        history.append(record)
        if mlflow_run is not None:
            _log_epoch_mlflow(record, epoch)
        if ckpt_path:
            _save_checkpoint(ckpt_path, {
                "model": _cpu_state(model), "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                "epoch": epoch, "step": step, "best_auc": best_auc, "best_epoch": best_epoch,
                "bad_epochs": bad_epochs, "best_model": best_state, "history": json.dumps(history),
            })
        if val is not None and bad_epochs >= max(config.patience, 1):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = [h["seconds"] for h in history]
    result = TrainResult(
        best_epoch=best_epoch,
        best_val_auc=best_auc if val is not None else float("nan"),
        history=history,
        seconds_per_epoch=float(np.mean(seconds)) if seconds else 0.0,
        steps=step,
    )
    if mlflow_run is not None:
        import mlflow

        mlflow.log_metric("best_val_auc_mean", result.best_val_auc)
        mlflow.log_metric("best_epoch", best_epoch)
    return result


def _start_mlflow(config: TrainConfig, model: MultiTaskModel):
    import mlflow

    mlflow.set_tracking_uri(config.mlflow_tracking_uri)
    mlflow.set_experiment(config.mlflow_experiment)
    run = mlflow.active_run() or mlflow.start_run()
    params = {f"train.{k}": v for k, v in asdict(config).items() if k not in ("mlflow_tracking_uri",)}
    params.update({f"model.{k}": v for k, v in asdict(model.config).items()})
    params.update({f"loss.{k}": v for k, v in asdict(model.loss_config).items()})
    params["model.name"] = model.registry_name or model.name
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return run


def _log_epoch_mlflow(record: dict, epoch: int) -> None:
    import mlflow

    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
    for i, value in enumerate(record.get("val_auc", [])):
        metrics[f"val_auc_{i}"] = value
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=epoch)


def read_negative_rate(train_dir: str) -> float:
    """The ``negative_rate`` of ``<train_dir>/../split.json`` (written by the Beam split), else 1.0."""
    path = os.path.join(os.path.dirname(os.path.abspath(train_dir)), SPLIT_FILE)
    if not os.path.exists(path):
        return 1.0
    with open(path) as fh:
        try:
            return float(json.load(fh).get("negative_rate", 1.0))
        except (ValueError, TypeError, AttributeError) as err:
            raise DatasetError(f"{path}: cannot read 'negative_rate' ({err})") from None


def check_same_spec(expected, actual, what: str) -> None:
    """Raise a DatasetError naming the differing spec fields (labels, features, their order)."""
    diffs = [key for key in ("labels", "categorical", "numerical")
             if tuple(getattr(expected, key)) != tuple(getattr(actual, key))]
    if diffs:
        detail = "; ".join(f"{k}: expected {list(getattr(expected, k))}, got {list(getattr(actual, k))}" for k in diffs)
        raise DatasetError(f"{what}: spec does not match ({detail})")


def train_from_dirs(train_dir: str, val_dir: str, out_dir: str, model_name: str = "apem",
                    model_overrides: dict | None = None, loss_overrides: dict | None = None,
                    config: TrainConfig | None = None, negative_rate: float | None = None) -> dict:
    """Read datasets, fit features on train, train a registry model, save it to ``out_dir``.

    ``negative_rate`` (None: read from ``<train_dir>/../split.json``, else 1.0) is stored with the
    model so predictions are recalibrated to the entire space (:func:`apem.calibration.recalibrate`).
    Checkpoints go to ``<out_dir>.checkpoints`` unless ``config.checkpoint_dir`` is set.
    Returns a JSON-able summary.
    """
    from apem.modelio import save_model
    from apem.models.registry import build_model

    config = config or TrainConfig()
    if config.checkpoint_dir is None:
        config = TrainConfig(**{**asdict(config), "checkpoint_dir": os.path.abspath(out_dir) + ".checkpoints"})
    train_ds = read_dataset(train_dir)
    val_ds = read_dataset(val_dir)
    check_same_spec(train_ds.spec, val_ds.spec, f"{val_dir} (validation) vs {train_dir} (training)")
    if negative_rate is None:
        negative_rate = read_negative_rate(train_dir)
    if not 0.0 < negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
    set_seed(config.seed)
    encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
    train, val = encode_dataset(train_ds, encoder), encode_dataset(val_ds, encoder)
    model = build_model(model_name, encoder.fields, len(train_ds.spec.labels), model_overrides, loss_overrides)
    result = fit(model, train, val, config)
    meta = {"negative_rate": negative_rate, "train_rows": len(train), "val_rows": len(val),
            "train_dir": os.path.abspath(train_dir), "val_dir": os.path.abspath(val_dir),
            "best_epoch": result.best_epoch, "best_val_auc": result.best_val_auc,
            "train_config": {k: v for k, v in asdict(config).items() if k != "mlflow_tracking_uri"}}
    model_dir = save_model(out_dir, model.cpu(), encoder, train_ds.spec, extra_meta=meta)
    if config.mlflow_tracking_uri:
        import mlflow

        mlflow.log_artifacts(model_dir, artifact_path="model")
        mlflow.end_run()
    return {"model_dir": model_dir, "model": model_name, "negative_rate": negative_rate,
            "train_rows": len(train), "val_rows": len(val), **result.to_dict()}
