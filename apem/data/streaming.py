"""Reading a dataset directory in bounded pieces: row groups, chunks, and a bounded shuffle buffer.

A dataset's Parquet files (local or ``gs://``, :mod:`apem.data.storage`) are cut into **units**,
one per row group. A pass over the data reads units in an order shuffled per (seed, epoch), a
few units interleaved at a time, each in chunks of ``chunk_rows`` rows. A chunk is validated like
:func:`apem.data.spec.read_dataset` validates a file (schema, 0/1 labels) and the spec's funnel
policy is applied to it (``drop`` removes violating rows, ``reject`` raises naming the file).

Memory held at any time is bounded by the settings and the row-group size, not by the row count:
the open units' current chunks (``interleave`` x ``chunk_rows`` decoded rows, plus what pyarrow
buffers of each open row group) and the :class:`ShuffleBuffer` (``capacity`` encoded rows and at
most as much again while it emits). A ``gs://`` file is read into
memory whole while its units are read (one file per open unit), so cloud shards should stay at the
~1M rows :func:`apem.data.spec.write_dataset` and the Beam split write.

Nothing here knows about torch or models: a pass yields numpy ``(x, y)`` batches made by an
``encode`` callable (the fitted :class:`apem.data.encoding.FeatureEncoder` in training).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apem.data import storage
from apem.data.encoding import DEFAULT_RESERVOIR_ROWS, FeatureEncoder
from apem.data.spec import (SPEC_FILE, Dataset, DatasetError, DatasetSpec, funnel_violations, validate_labels,
                             validate_schema)

_LOG = logging.getLogger(__name__)
DEFAULT_CHUNK_ROWS = 65_536
DEFAULT_INTERLEAVE = 4  # units read round-robin, so one buffer mixes rows from several row groups


@dataclass(frozen=True, order=True)
class Unit:
    """One row group of one Parquet file: the smallest piece a pass shuffles or a worker takes."""

    file: str
    row_group: int
    rows: int
    bytes: int = 0  # the row group's uncompressed size (identifies its content in a checkpoint's run identity)


def dataset_files(path: str) -> list[str]:
    """The dataset's Parquet files, sorted (local or gs://); a DatasetError naming ``path`` if none."""
    files = storage.list_files(path, suffix=".parquet") if storage.is_gcs(path) else \
        sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet")) \
        if os.path.isdir(path) else []
    if not files:
        raise DatasetError(f"{path}: no Parquet files in dataset directory")
    return files


def open_parquet(file: str, spec: DatasetSpec | None = None) -> pq.ParquetFile:
    """A ParquetFile over a local path or a gs:// object (read into memory: one shard at a time).
    String categoricals are read as dictionaries, as :func:`apem.data.spec.read_checked_file` does."""
    source = pa.BufferReader(storage.read_bytes(file)) if storage.is_gcs(file) else file
    try:
        schema = pq.read_schema(source)
        dictionary = [c for c in (spec.categorical if spec else ())
                      if schema.get_field_index(c) >= 0 and pa.types.is_string(schema.field(c).type)]
        return pq.ParquetFile(source, read_dictionary=dictionary)
    except Exception as err:  # pyarrow raises several types for corrupt files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DatasetError(f"{file}: not a readable Parquet file ({first})") from None


def list_units(path: str, spec: DatasetSpec) -> list[Unit]:
    """Every non-empty row group of the dataset at ``path``, in file order; schemas are checked here."""
    units = []
    for file in dataset_files(path):
        parquet = open_parquet(file, spec)
        validate_schema(spec, parquet.schema_arrow, file)
        meta = parquet.metadata
        groups = (meta.row_group(g) for g in range(meta.num_row_groups))
        units.extend(Unit(file, g, group.num_rows, group.total_byte_size) for g, group in enumerate(groups)
                     if group.num_rows)
    return units


def read_unit(unit: Unit, spec: DatasetSpec, columns: Iterable[str], chunk_rows: int = DEFAULT_CHUNK_ROWS,
              dropped: dict[str, int] | None = None) -> Iterator[pa.Table]:
    """The unit's rows in chunks of at most ``chunk_rows``, labels checked and the funnel policy applied.
    ``dropped`` (optional) accumulates the rows a ``drop`` policy removed, per step pair.
    Lazy: the file is opened at the first ``next``."""
    parquet = open_parquet(unit.file, spec)
    name = f"{unit.file} (row group {unit.row_group})"
    for batch in parquet.iter_batches(batch_size=chunk_rows, row_groups=[unit.row_group],
                                      columns=list(columns), use_threads=False):
        table = pa.Table.from_batches([batch])
        validate_labels(spec, table, name)
        mask, by_step = funnel_violations(spec, Dataset(spec, table).labels())
        if mask.any() and spec.funnel_policy == "reject":
            raise DatasetError(f"{name}: {int(mask.sum())} row(s) violate the funnel order {list(spec.labels)} "
                               f"({by_step}); fix the data or set funnel_policy: drop")
        if dropped is not None and mask.any():
            for pair, count in by_step.items():
                dropped[pair] = dropped.get(pair, 0) + count
        yield table.filter(pa.array(~mask)) if mask.any() else table


def interleave(streams: Iterable[Iterator], width: int = DEFAULT_INTERLEAVE) -> Iterator:
    """Items of ``streams`` round-robin, at most ``width`` streams open at once (in the given order)."""
    pending, active = iter(streams), deque()
    exhausted = False
    while True:
        while not exhausted and len(active) < max(width, 1):
            stream = next(pending, None)
            if stream is None:
                exhausted = True
            else:
                active.append(stream)
        if not active:
            return
        stream = active.popleft()
        item = next(stream, StopIteration)
        if item is not StopIteration:
            yield item
            active.append(stream)


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """The generator of one (seed, epoch[, worker]): a resumed run shuffles like an uninterrupted one."""
    return np.random.default_rng([seed, epoch, *more])


def epoch_units(units: list[Unit], seed: int, epoch: int, worker: int = 0, workers: int = 1) -> list[Unit]:
    """This worker's units in this epoch: one shuffled order of all units, dealt round-robin to workers,
    so workers hold disjoint units that together cover every unit once."""
    order = epoch_rng(seed, epoch).permutation(len(units))
    return [units[i] for i in order[worker::workers]]


class ShuffleBuffer:
    """A bounded shuffle buffer of encoded rows: never holds more than ``capacity`` rows.

    Rows are added until it is full; then it emits a random half of its rows (a whole number of
    batches) and keeps the other half to mix with what comes next. ``flush`` emits the rest, the
    last batch possibly short. Every row added is emitted exactly once. ``max_fill`` records the
    most rows ever held (the structural memory bound that tests assert).
    """

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator) -> None:
        self.capacity = max(int(capacity), 2 * batch_size)
        self.batch_size, self.rng = batch_size, rng
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.fill = self.max_fill = 0

    def _allocate(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = np.empty((self.capacity, *x.shape[1:]), x.dtype)
        self.y = np.empty((self.capacity, *y.shape[1:]), y.dtype)

    def add(self, x: np.ndarray, y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.x is None:
            self._allocate(x, y)
        start = 0
        while start < len(x):
            take = min(self.capacity - self.fill, len(x) - start)
            self.x[self.fill:self.fill + take] = x[start:start + take]
            self.y[self.fill:self.fill + take] = y[start:start + take]
            self.fill += take
            start += take
            self.max_fill = max(self.max_fill, self.fill)
            if self.fill == self.capacity:
                yield from self._emit((self.capacity // 2 // self.batch_size) * self.batch_size)

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from self._emit(self.fill)

    def _emit(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if rows <= 0:
            return
        order = self.rng.permutation(self.fill)
        out_x, out_y = self.x[order[:rows]], self.y[order[:rows]]  # fancy indexing copies
        kept = order[rows:]
        self.x[:len(kept)], self.y[:len(kept)] = self.x[kept], self.y[kept]
        self.fill = len(kept)
        for begin in range(0, rows, self.batch_size):
            yield out_x[begin:begin + self.batch_size], out_y[begin:begin + self.batch_size]


@dataclass(frozen=True)
class StreamSettings:
    """How a pass reads: rows per chunk, units interleaved, shuffle-buffer rows."""

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    interleave: int = DEFAULT_INTERLEAVE
    buffer_rows: int = 262_144  # ~36 MB of encoded rows at 140 bytes a row


Encode = Callable[[pa.Table], tuple[np.ndarray, np.ndarray]]


def shuffled_batches(units: list[Unit], spec: DatasetSpec, columns: Iterable[str], encode: Encode,
                     batch_size: int, settings: StreamSettings, rng: np.random.Generator,
                     buffer_seen: Callable[[ShuffleBuffer], None] | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded ``(x, y)`` batches of ``units`` (in the given order, ``settings.interleave`` at a time)
    through one bounded shuffle buffer. ``buffer_seen`` receives the buffer once the pass ends."""
    columns = list(columns)
    buffer = ShuffleBuffer(settings.buffer_rows, batch_size, rng)
    chunks = interleave((read_unit(u, spec, columns, settings.chunk_rows) for u in units), settings.interleave)
    for table in chunks:
        if table.num_rows:
            yield from buffer.add(*encode(table))
    yield from buffer.flush()
    if buffer_seen is not None:
        buffer_seen(buffer)


def ordered_batches(units: list[Unit], spec: DatasetSpec, columns: Iterable[str], encode: Encode,
                    batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded ``(x, y)`` chunks of ``units`` in file order, unshuffled (evaluation)."""
    columns = list(columns)
    for unit in units:
        for table in read_unit(unit, spec, columns, batch_rows):
            if table.num_rows:
                yield encode(table)


def fit_encoder_streaming(path: str, encoder: FeatureEncoder, settings: StreamSettings = StreamSettings(),
                          reservoir_rows: int = DEFAULT_RESERVOIR_ROWS, units: list[Unit] | None = None) -> int:
    """Fit ``encoder`` on the dataset at ``path`` chunk by chunk (:meth:`FeatureEncoder.fit_chunks`),
    with the same validation and funnel policy as a training pass; returns the rows it kept.
    ``units``: the dataset's :func:`list_units`, when the caller already has them."""
    spec = encoder.spec
    units = list_units(path, spec) if units is None else units

    dropped: dict[str, int] = {}

    def chunks(columns: list[str]) -> Iterator[pa.Table]:
        wanted = list(spec.labels) + [c for c in columns if c not in spec.labels]
        dropped.clear()  # a second pass (quantile codes) drops the same rows again
        for unit in units:
            yield from read_unit(unit, spec, wanted, settings.chunk_rows, dropped)

    rows = encoder.fit_chunks(chunks, reservoir_rows)
    if rows == 0:
        raise DatasetError(f"{path}: dataset has no rows")
    if dropped:
        _LOG.warning("%s: dropped row(s) violating the funnel order (per step pair: %s); every epoch drops them too",
                     path, {k: v for k, v in dropped.items() if v})
    return rows


def read_spec(path: str) -> DatasetSpec:
    """The ``spec.yaml`` of a local or a complete ``gs://`` dataset directory."""
    if not storage.is_gcs(path):
        return DatasetSpec.read(path)
    if not storage.is_complete(path):
        raise storage.StorageError(f"{path}: no complete dataset directory (no _SUCCESS marker)")
    return DatasetSpec.parse(storage.read_bytes(storage.join(path, SPEC_FILE)), source=storage.join(path, SPEC_FILE))
