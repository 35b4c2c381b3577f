"""Chronological train/val/test split with negative downsampling in train, as an Apache Beam pipeline.

Paper 4.1.1: train < val < test in time. Boundaries fall on whole days (UTC) of the spec's time
column, placed so each split's share of rows is as close as possible to ``ratios`` (8:1:1 by
default), every split getting at least one day.

Negative downsampling, train only: a row whose FIRST funnel label is 0 is kept when
``u(id) < R``, where ``u`` is a uniform number derived from a fixed 64-bit hash (FNV-1a +
splitmix64 finaliser) of the row's id column or, when the spec has none, of the row's own contents
(:func:`row_keys`: every spec column as text, in spec order). The same input therefore gives the same output on any
runner, any number of workers and any batching. Predictions are mapped back to the entire space by
:func:`apem.inference.calibration.recalibrate` with the ``negative_rate`` recorded in ``OUT/split.json``.

The pipeline is runner-agnostic: Parquet in via ``ReadFromParquetBatched`` (Arrow tables, not one
dict per row), one ``DoFn`` that routes each batch with vectorised numpy/Arrow work, Parquet out via
``WriteToParquetBatched``. Paths go through Beam's filesystems, so ``gs://`` works on Dataflow,
Flink or Spark given the usual pipeline options. Locally the DirectRunner runs multi-process unless
the options say otherwise. The launcher itself reads only the time column (to fix the day
boundaries) and, after the run, Parquet footers (row counts) and the oracle, when there is one.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apem.data import storage
from apem.data.atomic import make_staging_dir, replace_dir
from apem.data.oracle import GENERATOR_PATH, ORACLE_PATH
from apem.data.ownership import SPLIT_DIR, claim_output
from apem.data.spec import SPEC_FILE, DatasetSpec, funnel_violations, read_checked_file
from apem.data.split_record import SPLIT_FILE, SPLITS, check_negative_rate
from apem.dataplane.beam_gcs_emulator import anonymous_gcs_for_emulator
from apem.dataplane.beam_options import beam_pipeline

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_UNITS_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class SplitError(ValueError):
    """The dataset cannot be split (too few days, bad ratios, no rows)."""


def stable_hash(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit FNV-1a of each id's UTF-8 text (integers hash as their decimal text), splitmix64-finalised."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if not pa.types.is_string(ids.type):
        ids = pc.cast(ids, pa.string())
    if ids.null_count:
        raise SplitError(f"id column has {ids.null_count} null value(s); every row needs an id to be sampled")
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset:ids.offset + n + 1].astype(np.int64)
    data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if n else 0):
            rows = np.flatnonzero(lengths > j)
            h[rows] = (h[rows] ^ data[offsets[rows] + j].astype(np.uint64)) * _FNV_PRIME
        h = h + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return h


def row_keys(table: pa.Table, columns: tuple[str, ...]) -> pa.Array:
    """A stable text key per row from its own contents: the given columns as Arrow's text, joined by
    the unit separator (nulls as empty). It depends on the row alone, so it hashes the same on any
    runner and batching."""
    parts = []
    for name in columns:
        column = table.column(name).combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        parts.append(pc.cast(column, pa.string()))
    return pc.binary_join_element_wise(*parts, "\x1f", null_handling="replace", null_replacement="")


def keep_negatives(ids: pa.Array | pa.ChunkedArray, rate: float) -> np.ndarray:
    """Deterministic Bernoulli(rate) keep mask from the ids' hash."""
    if rate >= 1.0:
        return np.ones(len(ids), bool)
    u = (stable_hash(ids) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < rate


def day_index(times: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Whole UTC days since 1970-01-01 of a timestamp or date column."""
    if isinstance(times, pa.ChunkedArray):
        times = times.combine_chunks()
    if times.null_count:
        raise SplitError(f"time column has {times.null_count} null value(s)")
    if pa.types.is_date(times.type):
        return pc.cast(pc.cast(times, pa.date32()), pa.int32()).to_numpy().astype(np.int64)
    unit = times.type.unit
    raw = pc.cast(times.cast(pa.timestamp(unit, tz=None)), pa.int64()).to_numpy()
    return np.floor_divide(raw, 86_400 * _UNITS_PER_SECOND[unit])


def plan_boundaries(day_counts: dict[int, int], ratios=(8, 1, 1)) -> dict[str, tuple[int, int]]:
    """Inclusive (first_day, last_day) per split, whole days, shares of rows closest to ``ratios``."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or min(ratios) <= 0:
        raise SplitError(f"ratios must be three positive numbers (train, val, test), got {ratios}")
    days = sorted(d for d, c in day_counts.items() if c > 0)
    if len(days) < 3:
        raise SplitError(f"a chronological split needs rows on at least 3 days, found {len(days)}")
    cumulative = np.cumsum([day_counts[d] for d in days]) / sum(day_counts[d] for d in days)
    total = sum(ratios)
    train_end = int(np.argmin(np.abs(cumulative[:len(days) - 2] - ratios[0] / total)))
    val_candidates = cumulative[train_end + 1:len(days) - 1]
    val_end = train_end + 1 + int(np.argmin(np.abs(val_candidates - (ratios[0] + ratios[1]) / total)))
    return {
        "train": (days[0], days[train_end]),
        "val": (days[train_end + 1], days[val_end]),
        "test": (days[val_end + 1], days[-1]),
    }


def assign_batch(table: pa.Table, plan: dict[str, tuple[int, int]], spec: DatasetSpec,
                 negative_rate: float) -> dict[str, pa.Table]:
    """Route one Arrow batch to its splits (the one home of the split rule, used by Beam and the
    single-process reference alike); negatives in train are kept with ``negative_rate``, hashing the
    id column or, without one, the row's contents."""
    day = day_index(table.column(spec.time_column))
    out = {}
    for split in SPLITS:
        first, last = plan[split]
        mask = (day >= first) & (day <= last)
        if split == "train" and negative_rate < 1.0:
            keys = table.column(spec.id_column) if spec.id_column else row_keys(table, spec.columns)
            negative = np.asarray(pc.equal(table.column(spec.labels[0]), 0))
            mask &= ~negative | keep_negatives(keys, negative_rate)
        if mask.any():
            out[split] = table.filter(pa.array(mask))
    return out


def _open(uri: str):
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(uri, compression_type="uncompressed")


def _dataset_files(data_dir: str) -> list[str]:
    root = len(str(data_dir).rstrip("/").rstrip(os.sep)) + 1
    files = [f for f in storage.list_files(data_dir, suffix=".parquet") if not {"/", os.sep} & set(f[root:])]
    if not files:
        raise SplitError(f"{data_dir}: no Parquet files in dataset directory")
    return files


def _read_spec(data_dir: str) -> DatasetSpec:
    spec_uri = storage.join(data_dir, SPEC_FILE)
    if not storage.exists(spec_uri):
        raise SplitError(f"{spec_uri}: spec file not found (a dataset is Parquet files plus {SPEC_FILE})")
    return DatasetSpec.parse(storage.read_bytes(spec_uri), source=spec_uri)


def checked_day_counts(files: list[str], spec: DatasetSpec) -> dict[int, int]:
    """Rows per day, after checking each file against the data contract like every other reader
    (schema, dtypes, 0/1 labels, readable pages, the funnel order under ``reject``), one file at a
    time and before Beam starts, so bad data gives one line naming the file, not a worker traceback."""
    counts: dict[int, int] = {}
    for uri in files:
        with _open(uri) as fh:
            table = read_checked_file(fh, spec, name=uri)
        if spec.funnel_policy == "reject":
            bad, by_step = funnel_violations(spec, np.stack([table.column(c).to_numpy() for c in spec.labels], 1))
            if bad.any():
                raise SplitError(f"{uri}: {int(bad.sum())} row(s) violate the funnel order {list(spec.labels)} "
                                 f"({by_step})")
        days, n = np.unique(day_index(table.column(spec.time_column)), return_counts=True)
        for d, c in zip(days.tolist(), n.tolist()):
            counts[d] = counts.get(d, 0) + c
    return counts


def _row_count(files: list[str]) -> int:
    total = 0
    for uri in files:
        with _open(uri) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def _build_pipeline(pipeline, files_pattern: str, schema: pa.Schema, staging: str, plan, spec: DatasetSpec,
                    negative_rate: float) -> None:
    import apache_beam as beam
    from apache_beam.io.parquetio import ReadFromParquetBatched, WriteToParquetBatched

    class AssignSplit(beam.DoFn):  # defined here so importing apem.dataplane.split never imports Beam
        def process(self, table):
            for split, part in assign_batch(table, plan, spec, negative_rate).items():
                yield beam.pvalue.TaggedOutput(split, part)

    routed = (
        pipeline
        | "ReadParquet" >> ReadFromParquetBatched(files_pattern)
        | "AssignSplit" >> beam.ParDo(AssignSplit()).with_outputs(*SPLITS)
    )
    for split in SPLITS:
        _ = routed[split] | f"Write_{split}" >> WriteToParquetBatched(
            storage.join(staging, split, "part"), schema=schema, file_name_suffix=".parquet")


def split_dataset(data_dir: str, out_dir: str, negative_rate: float = 1.0, ratios: tuple = (8, 1, 1),
                  runner: str = "DirectRunner", pipeline_args: list[str] | None = None,
                  overwrite: bool = False) -> dict:
    """Split the dataset at ``data_dir`` into ``out_dir/{train,val,test}`` (datasets of the contract)
    and ``out_dir/split.json``; local paths or gs:// URIs. Only an earlier split (or anything, with
    ``overwrite``) is replaced, never the input. Returns the split.json content."""
    negative_rate = check_negative_rate(negative_rate, SplitError)
    claim_output(out_dir, SPLIT_DIR, inputs=(data_dir,), overwrite=overwrite)
    anonymous_gcs_for_emulator()
    spec = _read_spec(data_dir)
    files = _dataset_files(data_dir)
    counts = checked_day_counts(files, spec)
    plan = plan_boundaries(counts, ratios)
    with _open(files[0]) as fh:
        schema = pq.read_schema(fh)

    # Remote runners (Dataflow, Flink or Spark clusters) need gs:// paths, as for any Beam job.
    if storage.is_gcs(out_dir):
        staging = out_dir
        storage.delete_tree(out_dir)
    else:
        staging = make_staging_dir(out_dir)
    try:
        with beam_pipeline(runner, pipeline_args) as pipeline:
            pattern = storage.join(data_dir, "*.parquet")
            _build_pipeline(pipeline, pattern, schema, staging, plan, spec, negative_rate)
        summary = _finish(data_dir, staging, spec, schema, plan, counts, negative_rate, ratios, runner)
        if storage.is_gcs(out_dir):
            storage.write_bytes(storage.join(out_dir, storage.SUCCESS_MARKER), b"")
        else:
            replace_dir(staging, out_dir)
    except BaseException:
        if not storage.is_gcs(out_dir):
            storage.delete_tree(staging)
        raise
    return summary


def _finish(data_dir: str, staging: str, spec: DatasetSpec, schema: pa.Schema, plan, counts, negative_rate,
            ratios, runner) -> dict:
    import yaml

    spec_text = yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()
    oracle_uri = storage.join(data_dir, *ORACLE_PATH)
    oracle = None
    if storage.exists(oracle_uri) and spec.id_column:
        oracle = pq.read_table(io.BytesIO(storage.read_bytes(oracle_uri)))
    generator_uri = storage.join(data_dir, *GENERATOR_PATH)
    generator = storage.read_bytes(generator_uri) if oracle is not None and storage.exists(generator_uri) else None
    iso = lambda d: str(np.datetime64(int(d), "D"))  # noqa: E731
    rows = {}
    for split in SPLITS:
        split_dir = storage.join(staging, split)
        files = storage.list_files(split_dir, suffix=".parquet")
        if not files:  # a sink given no rows may write no shard; an empty split is still a dataset
            files = [storage.join(split_dir, "part-empty.parquet")]
            sink = io.BytesIO()
            pq.write_table(schema.empty_table(), sink)
            storage.write_bytes(files[0], sink.getvalue())
        storage.write_bytes(storage.join(split_dir, SPEC_FILE), spec_text)
        first, last = plan[split]
        before = sum(c for d, c in counts.items() if first <= d <= last)
        rows[split] = {"before_sampling": before, "after_sampling": _row_count(files)}
        if oracle is not None:
            ids = pa.concat_arrays([
                pq.read_table(_open(f), columns=[spec.id_column]).column(spec.id_column).combine_chunks()
                for f in files]) if files else pa.array([], pa.string())
            subset = oracle.filter(pc.is_in(oracle.column(spec.id_column), value_set=ids))
            sink = io.BytesIO()
            pq.write_table(subset, sink)
            storage.write_bytes(storage.join(split_dir, *ORACLE_PATH), sink.getvalue())
            if generator is not None:
                storage.write_bytes(storage.join(split_dir, *GENERATOR_PATH), generator)
        storage.write_bytes(storage.join(split_dir, storage.SUCCESS_MARKER), b"")  # each split is a dataset
    summary = {
        "negative_rate": negative_rate,
        "ratios": list(ratios),
        "boundaries": {s: [iso(plan[s][0]), iso(plan[s][1])] for s in SPLITS},
        "rows": rows,
        "sampled_split": "train",
        "sampling_key": spec.id_column or "row contents",
        "data": data_dir,
        "runner": runner,
    }
    storage.write_bytes(storage.join(staging, SPLIT_FILE), json.dumps(summary, indent=2).encode())
    return summary
