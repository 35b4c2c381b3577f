"""Ingestion as an Apache Beam pipeline: the rules of :mod:`apem.dataplane.ingest`, applied to shards.

The rules are not implemented twice: every stage below calls the rule functions of
:mod:`apem.dataplane.ingest` (one per rule) on a part of the data that holds everything the rule
needs, so the dataset and the quarantine are those of the single-process ingest, row for row:

1. ``Read`` (one raw file per element): :func:`~apem.dataplane.ingest.read_events_file` (rule 1) and
   :func:`~apem.dataplane.ingest.prepare_events` (rule 2, event part; row-local).
2. ``ByEventId`` -> ``DedupIds``: events are sharded by a stable hash of ``event_id`` (every copy of
   an id meets in one shard) for :func:`~apem.dataplane.ingest.drop_duplicate_ids` (rule 3, first half).
3. ``ByImpression`` -> ``Resolve``: sharded again by ``impression_id`` (an impression and all its
   follow-ups meet) for :func:`~apem.dataplane.ingest.resolve_impressions` (rules 3 to 6).
4. ``Write``: :func:`~apem.dataplane.ingest.typed_table` types each shard's rows with the typing flags
   combined over all shards (a side input), so a column gets the type one pass over all rows gives.

A shard travels as one Arrow table (batches, not one element per event), so the shuffle moves few,
large elements. Shards hold all events of a hash range of keys; their number follows the input size
(:data:`SHARD_BYTES` of raw input per shard), so one shard fits a worker whatever the window.
A raw file is read whole by one worker. Output: ``part-NNNNN.parquet`` per shard into a staging
directory, quarantine shards merged into the one ``quarantine.parquet`` of the single-process layout,
then published with the same ownership and atomic rules (``apem.data.ownership``, ``apem.data.atomic``).
Order differs from the single-process output (rows sorted by time within a part file); contents do not.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from apem.data import storage
from apem.data.atomic import make_staging_dir, replace_dir
from apem.data.features import default_spec
from apem.data.spec import SPEC_FILE, DatasetSpec, validate_schema
from apem.dataplane.beam_gcs_emulator import anonymous_gcs_for_emulator
from apem.dataplane.beam_options import beam_pipeline
from apem.dataplane.ingest import (DEFAULT_KEY, QUARANTINE_FILE, QUARANTINE_SCHEMA, SUMMARY_FILE, IngestError,
                                   Quarantine, carry_oracle, check_usable, check_window, claim_outputs,
                                   drop_duplicate_ids, feature_kinds, impression_count, ingest_summary,
                                   merge_feature_kinds, partition_files, prepare_events, quarantine_path,
                                   read_events_file, resolve_impressions, typed_table, window_days)
from apem.dataplane.split import stable_hash

SHARD_BYTES = 64 << 20  # raw input per shard: a shard's events fit one worker's memory many times over
MAX_SHARDS = 4096
SHARDS_DIR = "_shards"  # inside the quarantine staging: quarantine parts and the run's counts
COUNTS_FILE = "counts.json"
STATS = "stats"
KINDS = "kinds"


@dataclass(frozen=True)
class IngestJob:
    """What every worker needs to know (pickled into the DoFns)."""

    spec: DatasetSpec
    key: str
    start: dt.date
    end: dt.date
    attribution_window_days: int
    shards: int
    data_staging: str
    shards_dir: str


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _from_arrow(tables) -> pd.DataFrame:
    tables = list(tables)
    return pa.concat_tables(tables, promote=True).to_pandas() if len(tables) > 1 else tables[0].to_pandas()


def _by_shard(frame: pd.DataFrame, column: str, shards: int):
    """(shard, Arrow table) per shard present in ``frame``, the shard a stable hash of ``column``
    (the same on every worker and runner; Python's ``hash`` of a string is not)."""
    if not len(frame):
        return
    codes = stable_hash(pa.array(frame[column].to_numpy(dtype=object), pa.string())) % np.uint64(shards)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for rows in np.split(order, bounds):
        yield int(codes[rows[0]]), _to_arrow(frame.iloc[rows])


def _write_parquet(table: pa.Table, uri: str) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    with FileSystems.create(uri) as fh:
        fh.write(sink.getvalue())


def _flush_quarantine(quarantine: Quarantine, job: IngestJob, name: str) -> dict:
    """Write a stage's quarantine rows as one shard file (a fixed name: a retried bundle rewrites
    it); return the counts by reason."""
    if quarantine.parts:
        _write_parquet(quarantine.table(), storage.join(job.shards_dir, f"{name}.parquet"))
    return {"quarantine": quarantine.counts()}


class _ReadFile(beam.DoFn):
    def __init__(self, job: IngestJob):
        self.job = job

    def process(self, element):
        index, uri, kind, day = element
        quarantine = Quarantine()
        with FileSystems.open(uri, compression_type="uncompressed") as fh:
            frame = read_events_file(uri, fh.read(), kind, dt.date.fromisoformat(day), quarantine)
        stats = {"events_read": len(frame), "impressions_by_day": {day: impression_count(frame)}}
        events = prepare_events(frame, self.job.key, self.job.spec, quarantine)
        yield beam.pvalue.TaggedOutput(STATS, {**stats, **_flush_quarantine(quarantine, self.job, f"read-{index:06d}")})
        yield from _by_shard(events, "event_id", self.job.shards)


class _DedupIds(beam.DoFn):
    def __init__(self, job: IngestJob):
        self.job = job

    def process(self, element):
        shard, tables = element
        quarantine = Quarantine()
        events = drop_duplicate_ids(_from_arrow(tables), quarantine)
        yield beam.pvalue.TaggedOutput(STATS, _flush_quarantine(quarantine, self.job, f"dedup-{shard:06d}"))
        yield from _by_shard(events, "impression_id", self.job.shards)


class _Resolve(beam.DoFn):
    def __init__(self, job: IngestJob):
        self.job = job

    def process(self, element):
        shard, tables = element
        job, quarantine = self.job, Quarantine()
        resolved = resolve_impressions(_from_arrow(tables), job.spec, job.start, job.end,
                                       job.attribution_window_days, quarantine)
        stats = {"out_of_window": resolved.out_of_window,
                 **_flush_quarantine(quarantine, job, f"resolve-{shard:06d}")}
        yield beam.pvalue.TaggedOutput(STATS, stats)
        yield beam.pvalue.TaggedOutput(KINDS, resolved.kinds)
        if len(resolved.rows):
            yield shard, _to_arrow(resolved.rows)


class _WriteRows(beam.DoFn):
    def __init__(self, job: IngestJob):
        self.job = job

    def process(self, element, kinds):
        shard, rows = element
        job = self.job
        table = typed_table(rows.to_pandas(), kinds, job.key, job.spec)
        validate_schema(job.spec, table.schema, "table to write")
        _write_parquet(table, storage.join(job.data_staging, f"part-{shard:05d}.parquet"))
        labels = {step: int(np.asarray(table.column(step)).sum()) for step in job.spec.labels}
        yield {"rows": table.num_rows, "label_sums": labels}


def add_counts(parts) -> dict:
    """Sum of count dicts (nested dicts summed key by key): Beam's combiner for the run's counts."""
    out: dict = {}
    for part in parts:
        for name, value in part.items():
            out[name] = add_counts([out.get(name, {}), value]) if isinstance(value, dict) else out.get(name, 0) + value
    return out


class _WriteCounts(beam.DoFn):
    def __init__(self, job: IngestJob):
        self.job = job

    def process(self, counts):
        with FileSystems.create(storage.join(self.job.shards_dir, COUNTS_FILE)) as fh:
            fh.write(json.dumps(counts).encode())


def _build_pipeline(pipeline, job: IngestJob, files: list[tuple]) -> None:
    """The stages of the module docstring; counts of every stage are summed into ``counts.json``."""
    spec = job.spec

    def merge_kinds(parts):
        out = feature_kinds(pd.DataFrame({name: pd.Series(dtype=object) for name in spec.features}), spec)
        for part in parts:
            out = merge_feature_kinds(out, part)
        return out

    read = (pipeline
            | "Files" >> beam.Create(files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFile(job)).with_outputs(STATS, main="events"))
    deduped = (read.events
               | "ByEventId" >> beam.GroupByKey()
               | "DedupIds" >> beam.ParDo(_DedupIds(job)).with_outputs(STATS, main="events"))
    resolved = (deduped.events
                | "ByImpression" >> beam.GroupByKey()
                | "Resolve" >> beam.ParDo(_Resolve(job)).with_outputs(STATS, KINDS, main="rows"))
    kinds = resolved[KINDS] | "TypingFlags" >> beam.CombineGlobally(merge_kinds)
    written = resolved.rows | "Write" >> beam.ParDo(_WriteRows(job), kinds=beam.pvalue.AsSingleton(kinds))
    _ = ((read[STATS], deduped[STATS], resolved[STATS], written)
         | "AllCounts" >> beam.Flatten()
         | "SumCounts" >> beam.CombineGlobally(add_counts)
         | "WriteCounts" >> beam.ParDo(_WriteCounts(job)))


def _window_files(raw_uri: str, days: list[dt.date], window: list[dt.date], file_format: str | None):
    """(index, uri, format, day) of every readable file, the window's days without one, ignored files."""
    files, missing, ignored = [], [], []
    for day in days:
        readable = partition_files(raw_uri, day, file_format, ignored)
        if day in window and not readable:
            missing.append(day.isoformat())
        files += [(len(files) + i, uri, kind, day.isoformat()) for i, (uri, kind) in enumerate(readable)]
    return files, missing, ignored


def default_shards(files: list[tuple]) -> int:
    """One shard per :data:`SHARD_BYTES` of raw input (at least 1, at most :data:`MAX_SHARDS`)."""
    matches = FileSystems.match([uri for _, uri, _, _ in files]) if files else []
    size = sum(m.size_in_bytes for result in matches for m in result.metadata_list)
    return int(min(MAX_SHARDS, max(1, -(-size // SHARD_BYTES))))


def _staging(out: str) -> str:
    """Where the run writes before publishing: a staging sibling locally; on gs:// (remote runners
    need it) the output itself, emptied, marked complete last, as the Beam split does."""
    if storage.is_gcs(out):
        storage.delete_tree(out)
        return out
    return make_staging_dir(out)


def _merge_quarantine(shards_dir: str, q_staging: str) -> None:
    """The quarantine shards, streamed one at a time into the single ``quarantine.parquet``."""
    parts = storage.list_files(shards_dir, suffix=".parquet") if storage.exists(shards_dir) else []
    local = not storage.is_gcs(q_staging)
    target = storage.join(q_staging, QUARANTINE_FILE) if local else io.BytesIO()
    # the shards' schema carries the pandas metadata the single-process file has (line: nullable Int64)
    schema = pq.read_schema(io.BytesIO(storage.read_bytes(parts[0]))) if parts else QUARANTINE_SCHEMA
    with pq.ParquetWriter(target, schema) as writer:
        for uri in parts:
            writer.write_table(pq.read_table(io.BytesIO(storage.read_bytes(uri))).cast(schema))
        if not parts:
            writer.write_table(QUARANTINE_SCHEMA.empty_table())
    if not local:
        storage.write_bytes(storage.join(q_staging, QUARANTINE_FILE), target.getvalue())
    storage.delete_tree(shards_dir)


def _finish(raw_uri: str, out: str, job: IngestJob, window, lookahead, missing: list[str], ignored: list[str],
            allow_missing_days: bool, q_staging: str) -> dict:
    """After the pipeline: the window checks, the merged quarantine and ``ingest.json``, the dataset's
    spec and marker; returns the summary. Raises (nothing published) like the single-process ingest."""
    counts = json.loads(storage.read_bytes(storage.join(job.shards_dir, COUNTS_FILE)))
    by_day = counts.get("impressions_by_day", {})
    empty = [d.isoformat() for d in window if d.isoformat() in by_day and by_day[d.isoformat()] == 0]
    check_window(raw_uri, window, missing, empty, allow_missing_days, events_read=counts.get("events_read", 0))
    counts = {"rows": 0, "out_of_window": 0, "quarantine": {}, **counts, "missing_days": missing,
              "empty_days": empty, "ignored_files": ignored,
              "label_sums": {step: counts.get("label_sums", {}).get(step, 0) for step in job.spec.labels}}
    summary = ingest_summary(counts, window, lookahead, out, job.attribution_window_days)
    _merge_quarantine(job.shards_dir, q_staging)
    storage.write_bytes(storage.join(q_staging, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return summary


def _publish(staging: str, out: str) -> None:
    if storage.is_gcs(out):
        storage.write_bytes(storage.join(out, storage.SUCCESS_MARKER), b"")
    else:
        replace_dir(staging, out)


def ingest_beam(raw_uri: str, start: dt.date, end: dt.date, out: str, spec: DatasetSpec | None = None,
                attribution_window_days: int = 3, allow_missing_days: bool = False, file_format: str | None = None,
                overwrite: bool = False, runner: str = "DirectRunner", pipeline_args: list[str] | None = None,
                shards: int | None = None) -> dict:
    """:func:`apem.dataplane.ingest.ingest` on Beam: same arguments, outputs and summary, plus the
    runner and Beam options (``pipeline_args``) and the number of key shards (default: by input size)."""
    claim_outputs(raw_uri, out, overwrite)
    anonymous_gcs_for_emulator()
    spec = spec or default_spec()
    window, lookahead = window_days(start, end, attribution_window_days, file_format)
    files, missing, ignored = _window_files(raw_uri, window + lookahead, window, file_format)
    check_window(raw_uri, window, missing, [], allow_missing_days, events_read=None)
    data_staging, q_staging = _staging(out), _staging(quarantine_path(out))
    job = IngestJob(spec, spec.id_column or DEFAULT_KEY, window[0], window[-1], attribution_window_days,
                    shards or default_shards(files), data_staging, storage.join(q_staging, SHARDS_DIR))
    try:
        with beam_pipeline(runner, pipeline_args) as pipeline:
            _build_pipeline(pipeline, job, files)
        summary = _finish(raw_uri, out, job, window, lookahead, missing, ignored, allow_missing_days, q_staging)
        _publish(q_staging, quarantine_path(out))
        check_usable(summary, raw_uri, window)
        storage.write_bytes(storage.join(data_staging, SPEC_FILE), _spec_text(spec))
        storage.write_bytes(storage.join(data_staging, storage.SUCCESS_MARKER), b"")
        _publish(data_staging, out)
    except BaseException:
        for staging in (data_staging, q_staging):
            if not storage.is_gcs(staging) and storage.exists(staging):
                storage.delete_tree(staging)
        raise
    parts = storage.list_files(out, suffix=".parquet")
    carry_oracle(raw_uri, out, [pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=[job.key]).column(job.key)
                                for p in parts if "/oracle/" not in p])
    return {**summary, "engine": "beam", "runner": runner, "shards": job.shards}


def _spec_text(spec: DatasetSpec) -> bytes:
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()
