"""The trainer: one loop for every model of the registry (it never branches on the model type).

Training data is anything with the :class:`TrainingData` methods: :class:`EncodedData` (pre-encoded
tensors in memory, mini-batches taken through one ``randperm`` per epoch) or
:class:`apem.train.streaming.StreamingData` (Parquet row groups read, encoded and shuffled in a
bounded buffer). There is no per-row Python in encoding or in the hot loop. Each epoch ends with a
validation pass (early stopping on the mean validation AUC over tasks) and a checkpoint that
``resume`` continues from with the same result as an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from apem.data.encoding import FeatureEncoder
from apem.data.spec import Dataset
from apem.eval.metrics import auc
from apem.inference.predict import predict_stream
from apem.models.base import MultiTaskModel
from apem.train import tracking
from apem.train.checkpoint import (CHECKPOINT_FILE, Progress, cpu_state, fingerprint, load_checkpoint, run_identity,
                                  save_checkpoint)
from apem.train.malloc_tuning import keep_freed_memory_for_reuse


DATA_LOADINGS = ("auto", "memory", "streaming")
PRECISIONS = ("fp32", "bf16")


class TrainingData(Protocol):
    """What the trainer needs of its data; :class:`EncodedData` and the streaming data both have it."""

    def __len__(self) -> int: ...

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's (x, y) mini-batches, in an order fixed by (seed, epoch)."""

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in a fixed order, in chunks of any size (validation)."""

    def to_device(self, device: torch.device) -> "TrainingData":
        """The data to train from on ``device`` (itself, or a copy that already lives there)."""

    def fingerprint(self) -> str:
        """Identifies the data and its order for the checkpoint's run identity."""


@dataclass
class TrainConfig:
    """Adam with Table 2's batch 1024 and lr 1e-3. ``device``: auto (CUDA when present), cpu or cuda.
    ``checkpoint_dir``: where ``checkpoint.pt`` is written after every epoch; ``resume`` continues
    from it. ``mlflow_tracking_uri``: log params, per-epoch metrics (and, via
    :func:`apem.train.from_dirs.train_from_dirs`, the model directory) to that MLflow server or store.
    ``embedding_l2``: per-field weight decay on the embedding rows each batch uses (0: off, the
    paper's setting); ``embedding_l2_fields`` overrides it per field name, e.g. ``{"user_id": 1e-3}``.
    Each epoch's record then carries ``train_embedding_penalty``; every record carries
    ``embedding_row_norms`` (mean row norm per field), so the effect is visible with and without it."""

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
    embedding_l2: float = 0.0
    embedding_l2_fields: dict[str, float] = field(default_factory=dict)
    data_loading: str = "auto"  # memory | streaming | auto (apem.train.from_dirs.choose_data_loading)
    loader_workers: int = 0  # DataLoader worker processes that read and encode a streamed training set
    # "bf16": forward and loss under bf16 autocast (GPUs; on a CPU without AVX512_BF16 it is slower);
    # parameters, optimizer state and the saved model stay float32
    precision: str = "fp32"

    def __post_init__(self) -> None:
        bad = {n: v for n, v in {"(all fields)": self.embedding_l2, **self.embedding_l2_fields}.items()
               if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"embedding regularisation must be a finite number >= 0, got {bad}")
        if self.data_loading not in DATA_LOADINGS:
            raise ValueError(f"data_loading must be one of {', '.join(DATA_LOADINGS)}, got {self.data_loading!r}")
        if not (isinstance(self.loader_workers, int) and self.loader_workers >= 0):
            raise ValueError(f"loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def regularises_embeddings(self) -> bool:
        return self.embedding_l2 > 0 or any(v > 0 for v in self.embedding_l2_fields.values())

    def loggable(self) -> dict:
        """The settings that describe the run (not where it logs to)."""
        return {k: v for k, v in asdict(self).items() if k != "mlflow_tracking_uri"}


@dataclass
class EncodedData:
    x: torch.Tensor  # (n, F + D) int64: field indices, then dense_log values (apem.data.encoding)
    y: torch.Tensor  # (n, N) float32 labels in funnel order

    def __len__(self) -> int:
        return self.x.shape[0]

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=_epoch_generator(seed, epoch)).to(self.x.device)
        for begin in range(0, len(self), batch_size):
            idx = order[begin:begin + batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.x, self.y

    def to_device(self, device: torch.device) -> "EncodedData":
        # 140 bytes a row: even 10M rows sit on the GPU, so batches never cross PCIe
        return EncodedData(self.x.to(device), self.y.to(device)) if device.type == "cuda" else self

    def fingerprint(self) -> str:
        return fingerprint(self.x, self.y)


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


def validation_aucs(model: MultiTaskModel, data: TrainingData, device: torch.device) -> list[float]:
    """Per-task AUC over every row of ``data``, predicted chunk by chunk (only scores and labels are kept)."""
    label_chunks: list[torch.Tensor] = []

    def inputs() -> Iterator[torch.Tensor]:
        for x, y in data.eval_batches():
            label_chunks.append(y.cpu())
            yield x

    probs = predict_stream(model, inputs(), rows=len(data), device=device)
    labels = torch.cat(label_chunks).numpy() if label_chunks else np.zeros((0, model.n_tasks), np.float32)
    return [auc(labels[:, i], probs[:, i]) for i in range(labels.shape[1])]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): a resumed run shuffles exactly like an uninterrupted one.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


class _Loop:
    """One training run's state: the model, its optimizer, the data on the device and the progress."""

    def __init__(self, model: MultiTaskModel, train: TrainingData, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.device = resolve_device(config.device)
        model.to(self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.train = train.to_device(self.device)
        self.rows = len(train)
        # Streaming with workers ends each worker's share with a short batch (a few more steps); the
        # count only paces schedules such as APEM's gamma, which tolerate that.
        self.steps_per_epoch = -(-len(train) // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.progress = Progress()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.embedding_l2 = (model.embedding.field_weights(config.embedding_l2, config.embedding_l2_fields)
                             .to(self.device) if config.regularises_embeddings else None)

    def run_epoch(self, epoch: int) -> dict:
        """One pass over the training data in this epoch's order; returns the epoch's record."""
        model, config = self.model, self.config
        model.train()
        started, sums, batches, rows = time.perf_counter(), {}, 0, 0
        with _progress_bar(self.rows, f"epoch {epoch + 1}/{config.epochs}", config.progress) as bar:
            for x, y in self.train.epoch_batches(epoch, config.batch_size, config.seed):
                loss, parts = self.step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                batches += 1
                rows += x.shape[0]
                # summed on the device and read once per epoch: a float per step would make the host wait
                # for the GPU every step (the bar, shown only on a terminal, reads its loss each step)
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums[k] + v if k in sums else v
                if bar.disable is False:
                    bar.update(x.shape[0])
                    bar.set_postfix(loss=f"{float(loss):.4f}", rows_s=f"{rows / (time.perf_counter() - started):,.0f}")
        means = {f"train_{k}": float(v) / batches for k, v in sums.items()}  # the epoch's one wait for the device
        seconds = time.perf_counter() - started
        return {"epoch": epoch, "seconds": seconds, "samples_per_s": rows / seconds, "rows": rows, **means}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.model.set_training_progress(self.progress.step, self.total_steps)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            output = self.model(x)
        # outside autocast: CUDA autocast refuses binary_cross_entropy, and the loss wants float32 anyway
        loss, parts = self.model.loss(output.float(), y)
        if self.embedding_l2 is not None:
            penalty = self.model.embedding.row_penalty(x, self.embedding_l2)
            loss = loss + penalty
            parts = {**parts, "embedding_penalty": penalty.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress.step += 1
        return loss.detach(), parts

    def end_epoch(self, record: dict, val: TrainingData | None) -> None:
        """Validate, keep the best state, and count epochs without improvement."""
        p = self.progress
        record["embedding_row_norms"] = self.model.embedding.field_row_norms()
        if val is not None and len(val):
            record["val_auc"] = validation_aucs(self.model, val, self.device)
            valid = [a for a in record["val_auc"] if np.isfinite(a)]
            record["val_auc_mean"] = float(np.mean(valid)) if valid else float("nan")
        score = record.get("val_auc_mean", float(record["epoch"]))  # without validation the last epoch is best
        # Once the model's schedule settles (APEM: gamma at its floor, f_D binary), a best state from
        # before that (a soft selector) is forgotten, so early stopping restores a sharp model; until
        # it settles epochs compete as usual but use no patience. A run that never settles (the
        # fixed-rate gamma on small data) behaves exactly as before.
        settled = record["schedule_settled"] = self.model.schedule_settled()
        best_record = next((h for h in p.history if h["epoch"] == p.best_epoch), None)
        if settled and best_record is not None and not best_record.get("schedule_settled", True):
            p.best_auc = -float("inf")
        if np.isfinite(score) and score > p.best_auc:
            p.best_auc, p.best_epoch, p.bad_epochs = score, record["epoch"], 0
            self.best_state = cpu_state(self.model)
        elif settled:
            p.bad_epochs += 1
        p.history.append(record)
        p.next_epoch = record["epoch"] + 1

    def result(self, validated: bool) -> TrainResult:
        seconds = [h["seconds"] for h in self.progress.history]
        return TrainResult(best_epoch=self.progress.best_epoch,
                           best_val_auc=self.progress.best_auc if validated else float("nan"),
                           history=self.progress.history,
                           seconds_per_epoch=float(np.mean(seconds)) if seconds else 0.0,
                           steps=self.progress.step)


def fit(model: MultiTaskModel, train: TrainingData, val: TrainingData | None, config: TrainConfig,
        encoder_hash: str = "", task_names: list[str] | None = None) -> TrainResult:
    """Train ``model`` with Adam; return the history and leave the best-validation state loaded.
    ``task_names`` (the spec's labels) name the per-task metrics logged to MLflow.

    The per-step contract is model-agnostic: ``set_training_progress(step, total_steps)``,
    ``model(x)``, ``model.loss(output, y)``. Without ``val`` the last epoch is the best one.
    ``train`` and ``val`` are :class:`TrainingData`: in memory or streamed, the loop is the same.
    ``encoder_hash`` joins the checkpoint's run identity (:func:`apem.train.checkpoint.run_identity`).
    """
    if len(train) == 0:
        raise ValueError("training data has no rows")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    keep_freed_memory_for_reuse()
    set_seed(config.seed)
    loop = _Loop(model, train, config)
    patience = max(config.patience, 1)
    ckpt_path = os.path.join(config.checkpoint_dir, CHECKPOINT_FILE) if config.checkpoint_dir else None
    identity = run_identity(model, config.seed, {"name": "Adam", "lr": config.lr, "batch_size": config.batch_size},
                            train.fingerprint() if ckpt_path else "", encoder_hash)
    if config.resume and ckpt_path and os.path.exists(ckpt_path):
        loop.progress, loop.best_state = load_checkpoint(ckpt_path, model, loop.optimizer, identity)
    run = tracking.start_run(config.mlflow_tracking_uri, config.mlflow_experiment, config.loggable(), model) \
        if config.mlflow_tracking_uri else None
    stopped = loop.progress.bad_epochs >= patience  # a resumed run may already have stopped early
    for epoch in range(loop.progress.next_epoch, config.epochs if not stopped else 0):
        record = loop.run_epoch(epoch)
        loop.end_epoch(record, val)
        if run is not None:
            tracking.log_epoch(record, epoch, task_names)
        if ckpt_path:
            save_checkpoint(ckpt_path, model, loop.optimizer, loop.progress, loop.best_state, identity)
        if val is not None and loop.progress.bad_epochs >= patience:
            break
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    result = loop.result(validated=val is not None)
    if run is not None:
        tracking.log_result(result.best_val_auc, result.best_epoch)
    return result
