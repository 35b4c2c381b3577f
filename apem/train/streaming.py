"""Training data that streams from a dataset directory instead of sitting encoded in memory.

:class:`StreamingData` is a ``torch.utils.data.IterableDataset`` over the row groups of a dataset's
Parquet files (local or ``gs://``, :mod:`apem.data.streaming`). Each epoch it shuffles the row-group
order with ``(seed, epoch)``, deals the row groups round-robin to the DataLoader workers (0 workers:
the training process reads itself), and every worker encodes its chunks with the fitted encoder and
shuffles them through one bounded :class:`apem.data.streaming.ShuffleBuffer`. So every row comes
exactly once per epoch, the order is a function of (seed, epoch, workers), and memory is bounded by
the :class:`apem.data.streaming.StreamSettings`, whatever the row count.

It offers the trainer the same four methods as :class:`apem.train.trainer.EncodedData`
(``epoch_batches``, ``eval_batches``, ``to_device``, ``fingerprint``), so the trainer never asks
which one it has.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from apem.data.encoding import FeatureEncoder
from apem.data.spec import Dataset, DatasetSpec
from apem.data.streaming import (Encode, ShuffleBuffer, StreamSettings, Unit, epoch_rng, epoch_units, list_units,
                                 ordered_batches, shuffled_batches)
from apem.train.checkpoint import json_hash

# Rows per evaluation chunk: large, so a model's inference tables are used over many rows.
EVAL_CHUNK_ROWS = 262_144


class EncodeRows:
    """The training ``encode``: the fitted encoder's (rows, F + D) int64 input and the float32 labels.
    A class rather than a closure so DataLoader workers can receive it under any start method."""

    def __init__(self, encoder: FeatureEncoder) -> None:
        self.encoder = encoder

    def __call__(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.transform(table), Dataset(self.encoder.spec, table).labels()


class StreamingData(IterableDataset):
    """Shuffled, encoded training batches of the dataset at ``path``; see the module docstring.

    ``rows``: the row count after the funnel policy (from the streaming fit), else the files' count.
    ``columns``: what ``encode`` reads (default: the spec's features and labels).
    ``buffers``: when given, every worker-0 pass appends its shuffle buffer there (tests read
    ``max_fill``; with workers > 0 the buffers live in the worker processes and are not seen).
    """

    def __init__(self, path: str, spec: DatasetSpec, encode: Encode, rows: int | None = None, workers: int = 0,
                 settings: StreamSettings = StreamSettings(), columns: list[str] | None = None,
                 units: list[Unit] | None = None) -> None:
        super().__init__()
        self.path, self.spec, self.encode = path, spec, encode
        self.units = units if units is not None else list_units(path, spec)
        self.rows = int(rows) if rows is not None else sum(u.rows for u in self.units)
        self.workers, self.settings = max(int(workers), 0), settings
        self.columns = columns or list(spec.features) + list(spec.labels)
        self.seed = self.epoch = 0
        self.batch_size = 1024
        self.buffers: list[ShuffleBuffer] | None = None

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = epoch_units(self.units, self.seed, self.epoch, worker, workers)
        seen = self.buffers.append if self.buffers is not None and info is None else None
        for x, y in shuffled_batches(units, self.spec, self.columns, self.encode, self.batch_size, self.settings,
                                     epoch_rng(self.seed, self.epoch, worker, workers), seen):
            yield torch.from_numpy(x), torch.from_numpy(y)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's shuffled batches, read by ``workers`` DataLoader processes (0: in this one)."""
        self.epoch, self.batch_size, self.seed = epoch, batch_size, seed
        if self.workers == 0:
            return iter(self)
        # its own generator: starting workers draws a seed, which must not move the global RNG (dropout, init)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return iter(DataLoader(self, batch_size=None, num_workers=self.workers, prefetch_factor=2,
                               persistent_workers=False, generator=generator))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in file order, in chunks of :data:`EVAL_CHUNK_ROWS` (validation)."""
        for x, y in ordered_batches(self.units, self.spec, self.columns, self.encode, EVAL_CHUNK_ROWS):
            yield torch.from_numpy(x), torch.from_numpy(y)

    def to_device(self, device: torch.device) -> "StreamingData":
        return self  # batches move to the device one at a time

    def fingerprint(self) -> str:
        """The files' row groups and what decides the order (settings, workers): a checkpoint of
        another dataset or another reading order is not resumed."""
        units = [(os.path.basename(u.file), u.row_group, u.rows, u.bytes) for u in self.units]
        return json_hash({"units": units, "rows": self.rows, "workers": self.workers,
                          "settings": asdict(self.settings), "columns": self.columns})
