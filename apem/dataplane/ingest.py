"""Ingestion: raw daily event partitions -> one funnel row per impression (a dataset of the contract).

Input: ``RAW/dt=YYYY-MM-DD/*.jsonl|*.csv|*.parquet`` (local or gs://), the layout of
:mod:`apem.research.synth_events`. A partition holds the events that *arrived* that day.

A window day without a partition is a *missing* day, one without impression events an *empty* day;
either is an :class:`IngestError` unless ``allow_missing_days``.

Rules, in order (every event that is not used ends up in the quarantine with a reason, or, for
events that belong to the next window, in the ``out_of_window`` count of the summary):

1. Lines that are not a JSON object / a CSV row of the header's width -> ``unparsable_line``.
2. Events lacking ``event_id``, ``event_type``, ``event_time`` or the impression key, and
   impressions lacking a categorical feature (null, absent from the line, or a column its file
   lacks, whatever the other files of the day have) -> ``missing_field``. A value that does not parse
   (time, number, unknown event type) -> ``bad_value``. Null numericals are kept as NaN (the
   validation step checks their presence against the schema). Every value is read as text: a nested
   one (a JSON object or array, a Parquet list, struct or map) as its JSON text, bytes that are not
   UTF-8 with replacement characters, in every file format; so a list where a number is expected is a
   ``bad_value``, and a column no rule reads is ignored whatever its type.
3. A repeated ``event_id``, or a second event of the same step for one impression ->
   ``duplicate_event``; the first to arrive is kept.
4. Impressions come from the window's partitions ``[start, end]``. Follow-up events (the spec's
   label names, in funnel order) are read from the window and from the ``attribution_window_days``
   partitions after it, when present. A follow-up in the window whose impression is unknown ->
   ``unknown_impression`` (a follow-up in the look-ahead whose impression is unknown belongs to
   the next window: counted as ``out_of_window``, not quarantined). Follow-ups of a quarantined
   impression -> ``unknown_impression`` too, with that detail.
5. A follow-up more than ``attribution_window_days`` after its impression -> ``late_beyond_window``.
6. An impression whose steps break the funnel (a step without the one before it, or a step earlier
   than the one before it or than the impression) -> ``out_of_order_steps``; the whole row goes.

Output column types: categoricals whose every value is an integer become int64, else strings;
numericals whose every value is an integer (and none missing) become int64, else float64; labels int8.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.feather as feather
import pyarrow.json as pjson
import pyarrow.parquet as pq

from apem.data import storage
from apem.data.features import default_spec
from apem.data.oracle import GENERATOR_PATH, ORACLE_DIR, ORACLE_FILE
from apem.data.ownership import DATASET_DIR, QUARANTINE_DIR, claim_output
from apem.data.spec import DatasetSpec, validate_schema

QUARANTINE_REASONS = (
    "unparsable_line", "missing_field", "bad_value", "duplicate_event", "unknown_impression",
    "late_beyond_window", "out_of_order_steps",
)
QUARANTINE_SUFFIX = "_quarantine"
QUARANTINE_FILE = "quarantine.parquet"
SUMMARY_FILE = "ingest.json"
FORMAT_SUFFIXES = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "parquet": (".parquet",)}
IMPRESSION = "impression"
EVENT_FIELDS = ("event_id", "event_type", "event_time")
DEFAULT_KEY = "impression_id"
_INT_RE = r"^\s*[-+]?\d+\s*$"
_FLOAT_RE = r"^\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|NaN|inf|Infinity))\s*$"
_TIME_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z?$"
QUARANTINE_SCHEMA = pa.schema([
    ("reason", pa.string()), ("impression_id", pa.string()), ("event_id", pa.string()),
    ("event_type", pa.string()), ("event_time", pa.string()), ("source", pa.string()),
    ("line", pa.int64()), ("detail", pa.string()), ("raw", pa.string()),
])


class IngestError(ValueError):
    """The window cannot be ingested (missing or empty partition, unreadable file)."""


def quarantine_path(out: str) -> str:
    """Where :func:`ingest` puts the quarantine of the dataset written at ``out``."""
    return str(out).rstrip("/") + QUARANTINE_SUFFIX


def _file_format(uri: str, wanted: str | None) -> str | None:
    for name, suffixes in FORMAT_SUFFIXES.items():
        if uri.endswith(suffixes) and (wanted is None or wanted == name):
            return name
    return None


_BOOKKEEPING_COLUMNS = ("source", "line", "row", "partition", "t", "raw")


def _event_text(frame: pd.DataFrame) -> list[str]:
    """The event as read (its fields as text, JSON), for quarantined rows that parsed as records:
    the quarantine keeps what arrived for every reason, not only for unparsable lines."""
    fields = [c for c in frame.columns if c not in _BOOKKEEPING_COLUMNS]
    return [json.dumps({k: v for k, v in zip(fields, row) if isinstance(v, str)}, sort_keys=True)[:500]
            for row in frame[fields].itertuples(index=False, name=None)]


class Quarantine:
    def __init__(self) -> None:
        self.parts: list[pd.DataFrame] = []

    def add(self, reason: str, frame: pd.DataFrame, detail: str | pd.Series = "") -> None:
        if len(frame) == 0:
            return
        part = pd.DataFrame({"reason": reason}, index=frame.index)
        for column in ("impression_id", "event_id", "event_type", "event_time", "source", "line"):
            part[column] = frame[column] if column in frame else None
        part["raw"] = frame["raw"] if "raw" in frame else _event_text(frame)
        part["detail"] = detail
        self.parts.append(part)

    def table(self) -> pa.Table:
        if not self.parts:
            return QUARANTINE_SCHEMA.empty_table()
        frame = pd.concat(self.parts, ignore_index=True)
        frame["line"] = pd.to_numeric(frame["line"]).where(lambda v: v >= 0).astype("Int64")  # -1: not known
        for column in QUARANTINE_SCHEMA.names:
            if column != "line":
                frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
                frame[column] = frame[column].map(lambda v: v if v is None else str(v))
        return pa.Table.from_pandas(frame[QUARANTINE_SCHEMA.names], schema=QUARANTINE_SCHEMA, preserve_index=False)

    def counts(self) -> dict[str, int]:
        out = {reason: 0 for reason in QUARANTINE_REASONS}
        for part in self.parts:
            out[part["reason"].iat[0]] += len(part)
        return out


def _nested_as_json_text(column: pa.ChunkedArray) -> pa.Array:
    """A list, struct or map column as the text :func:`_json_text` gives each value, as for a JSON line
    whose field types vary."""
    return pa.array([_json_text(v) for v in column.to_pylist()], pa.string())


def _binary_as_text(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Bytes as UTF-8 text; bytes that are not UTF-8 are decoded with replacement characters, so they
    reach the checks (and the quarantine) instead of failing the file."""
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in column.to_pylist()], pa.string())


def _as_strings(table: pa.Table) -> pa.Table:
    """Every column as nullable strings: one parse path for JSON, CSV and Parquet inputs. A nested
    value (a JSON object or array, a Parquet list, struct or map) becomes its JSON text in every
    format, so it is then checked like any other text (a bad_value where a number, time or event type
    is expected)."""
    columns = []
    for column in table.columns:
        if pa.types.is_timestamp(column.type):
            column = pc.strftime(column, format="%Y-%m-%dT%H:%M:%S")
        if pa.types.is_floating(column.type):  # keep "682.0" a float: no ".0" would read as an integer
            text = pc.cast(column, pa.string())
            whole = pc.fill_null(pc.match_substring_regex(text, _INT_RE), False)
            column = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
        if pa.types.is_nested(column.type):
            column = _nested_as_json_text(column)
        elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            column = _binary_as_text(column)
        columns.append(column if pa.types.is_string(column.type) else pc.cast(column, pa.string()))
    return pa.table(columns, names=table.column_names)


JSONL_CHUNK_LINES = 8192


def _read_jsonl(data: bytes, source: str, quarantine: Quarantine) -> tuple[pa.Table, np.ndarray]:
    """Parse chunks of lines with Arrow's JSON reader; only a chunk that fails is checked line by
    line in Python to find (and quarantine) its unparsable lines, then its good lines are re-read."""
    numbered = [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    tables, numbers, bad = [], [], []
    for begin in range(0, len(numbered), JSONL_CHUNK_LINES):
        chunk = numbered[begin:begin + JSONL_CHUNK_LINES]
        try:
            tables.append(_as_strings(pjson.read_json(io.BytesIO(b"\n".join(line for _, line in chunk)))))
            numbers.extend(n for n, _ in chunk)
            continue
        except pa.ArrowInvalid:
            pass
        records, good_numbers = [], []
        for number, line in chunk:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
                good_numbers.append(number)
            else:
                bad.append((number, line.decode("utf-8", "replace")[:500]))
        if records:
            try:  # the bad lines are out: Arrow's reader usually takes the rest
                good = set(good_numbers)
                tables.append(_as_strings(pjson.read_json(io.BytesIO(
                    b"\n".join(line for n, line in chunk if n in good)))))
            except pa.ArrowInvalid:  # a field whose JSON type varies between lines
                keys = sorted({k for r in records for k in r})
                tables.append(pa.table({k: pa.array([_json_text(r.get(k)) for r in records], pa.string())
                                        for k in keys}))
            numbers.extend(good_numbers)
    if bad:
        quarantine.add("unparsable_line", pd.DataFrame({
            "source": source, "line": [n for n, _ in bad], "raw": [text for _, text in bad]}),
            "not a JSON object")
    if not tables:
        return pa.table({}), np.zeros(0, np.int64)
    return pa.concat_tables(tables, promote=True), np.asarray(numbers, np.int64)


def _json_text(value) -> str | None:
    """A decoded JSON value as the text _as_strings would give for it."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    if isinstance(value, (dict, list)):  # a Parquet struct may hold values JSON has no type for (a timestamp)
        return json.dumps(value, default=str)
    return value if isinstance(value, str) else str(value)


def _read_csv(data: bytes, source: str, quarantine: Quarantine) -> tuple[pa.Table, np.ndarray]:
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    names = [n.strip() for n in header.split(",")]
    bad = []

    def on_invalid(row) -> str:
        bad.append((row.number, row.text))
        return "skip"

    try:
        table = pcsv.read_csv(
            io.BytesIO(data),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                strings_can_be_null=True),
        )
    except pa.ArrowInvalid as err:
        raise IngestError(f"{source}: unreadable CSV ({err})") from None
    if bad:
        quarantine.add("unparsable_line", pd.DataFrame({
            "source": source, "line": [n if n is not None and n >= 0 else None for n, _ in bad],
            "raw": [text[:500] for _, text in bad],
        }), "wrong number of CSV fields")
    return table, np.full(table.num_rows, -1, np.int64)


def _read_parquet(data: bytes, source: str) -> tuple[pa.Table, np.ndarray]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise IngestError(f"{source}: not a readable Parquet file ({err})") from None
    return _as_strings(table), np.full(table.num_rows, -1, np.int64)


def read_events_file(uri: str, data: bytes, kind: str, day: dt.date, quarantine: Quarantine) -> pd.DataFrame:
    """Rule 1 for one raw file: its parsed events as text columns plus where each arrived
    (``source``, ``line``, ``row`` = position in the file, ``partition`` = the day). Shared by the
    single-process and the Beam ingest: a file is the unit both read."""
    if kind == "jsonl":
        table, lines = _read_jsonl(data, uri, quarantine)
    elif kind == "csv":
        table, lines = _read_csv(data, uri, quarantine)
    else:
        table, lines = _read_parquet(data, uri)
    frame = table.to_pandas() if table.num_columns else pd.DataFrame(index=range(0))
    frame["source"] = uri
    frame["line"] = lines if len(lines) == len(frame) else -1
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    frame["partition"] = day
    return frame


def impression_count(frame: pd.DataFrame) -> int:
    """Impression events of a frame as read (before any check): a window day without one is empty."""
    return int((frame.get("event_type", pd.Series(dtype=object)) == IMPRESSION).sum())


def partition_files(raw_uri: str, day: dt.date, file_format: str | None,
                    ignored: list[str]) -> list[tuple[str, str]]:
    """The readable files of one day's partition as (uri, format); the others go to ``ignored``."""
    files = storage.list_files(storage.join(raw_uri, f"dt={day.isoformat()}"))
    readable = [(f, _file_format(f, file_format)) for f in files if _file_format(f, file_format)]
    ignored.extend(f for f in files if not _file_format(f, file_format))
    return readable


def _read_partition(raw_uri: str, day: dt.date, file_format: str | None, quarantine: Quarantine,
                    ignored: list[str]) -> pd.DataFrame | None:
    readable = partition_files(raw_uri, day, file_format, ignored)
    if not readable:
        return None
    frames = [read_events_file(uri, storage.read_bytes(uri), kind, day, quarantine) for uri, kind in readable]
    return pd.concat(_with_columns_of_all(frames), ignore_index=True, sort=False)


def _with_columns_of_all(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Each file's events with the columns of every file of the day, those it lacks as nulls (None),
    as a field absent from some lines of one file reads: pandas' concat would fill them with NaN,
    which the text checks (:func:`_text`) cannot take, so a file without a feature column would
    break the ingest instead of its rows being quarantined (``missing_field``) like any other."""
    columns = list(dict.fromkeys(column for frame in frames for column in frame.columns))
    return [frame.assign(**{c: None for c in columns if c not in frame}) if len(frame.columns) < len(columns)
            else frame for frame in frames]


def _text(values: pd.Series) -> pa.Array:
    """A column of text (str or None) as an Arrow string array; a NaN raises (ArrowTypeError)."""
    return pa.array(values.to_numpy(dtype=object), pa.string())


def _matches(values: pd.Series | pa.Array, pattern: str) -> np.ndarray:
    text = values if isinstance(values, pa.Array) else _text(values)
    return pc.fill_null(pc.match_substring_regex(text, pattern), False).to_numpy(zero_copy_only=False)


def _present(text: pa.Array) -> np.ndarray:
    """Which values are there: Arrow's validity, cheaper than pandas' notna over Python objects."""
    return text.is_valid().to_numpy(zero_copy_only=False)


def _parse_times(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(datetime64[us] array, ok mask) for ISO-8601 UTC strings."""
    ok = _matches(values, _TIME_RE)
    text = values.where(ok, "1970-01-01T00:00:00").str.rstrip("Z").str.replace(" ", "T", regex=False)
    return text.to_numpy(dtype="datetime64[us]"), ok


def _feature_flags(values: pd.Series) -> tuple[bool, bool, bool]:
    """What the typing rule needs to know of one feature's values: (any present, every present value
    an integer, every value present and an integer). They combine over parts of the data with
    (or, and, and), so the Beam ingest types a column exactly as one pass over all rows would."""
    text = _text(values)
    present = _present(text)
    is_int = _matches(text, _INT_RE)
    return bool(present.any()), bool(is_int[present].all()), bool(is_int.all())


def feature_kinds(imps: pd.DataFrame, spec: DatasetSpec) -> dict[str, tuple[bool, bool, bool]]:
    """:func:`_feature_flags` of every feature over the window's impressions (before the feature checks)."""
    return {name: _feature_flags(imps[name]) for name in spec.features}


def merge_feature_kinds(a: dict, b: dict) -> dict:
    """The flags of two parts of the impressions, as if computed over both at once."""
    return {name: (a[name][0] or b[name][0], a[name][1] and b[name][1], a[name][2] and b[name][2]) for name in a}


def _as_int64(flags: tuple[bool, bool, bool], categorical: bool) -> bool:
    """The typing rule (module docstring): categoricals whose every value is an integer, numericals
    whose every value is an integer and none missing, become int64."""
    any_present, present_ints, all_ints = flags
    return (any_present and present_ints) if categorical else all_ints


def _bad_feature(values: pd.Series, categorical: bool) -> np.ndarray:
    """Rows whose feature value cannot be used: a missing categorical, a numerical that does not parse."""
    text = _text(values)
    if categorical:
        return ~_present(text)
    return _present(text) & ~_matches(text, _FLOAT_RE)


def _typed_feature(values: pd.Series, categorical: bool, as_int64: bool) -> pa.Array:
    """The typed column of checked values (no bad ones left), following the typing rule. Missing
    values are None here, never NaN (:func:`feature_kinds` converted every value with :func:`_text`)."""
    if as_int64:
        return _text(values).cast(pa.int64())
    if categorical:
        return _text(values)
    return pa.array(pd.to_numeric(values, errors="coerce").to_numpy(np.float64))


def _checked_arguments(start: dt.date | str, end: dt.date | str, attribution_window_days: int,
                       file_format: str | None) -> tuple[dt.date, dt.date]:
    """The window's first and last day as dates (the CLI passes ISO strings); bad arguments raise."""
    if isinstance(start, str):
        start = dt.date.fromisoformat(start)
    if isinstance(end, str):
        end = dt.date.fromisoformat(end)
    if end < start:
        raise IngestError(f"--end {end} is before --start {start}")
    if attribution_window_days < 0:
        raise IngestError(f"attribution window must be >= 0 days, got {attribution_window_days}")
    if file_format is not None and file_format not in FORMAT_SUFFIXES:
        raise IngestError(f"file format must be one of {list(FORMAT_SUFFIXES)}, got {file_format!r}")
    return start, end


def check_window(raw_uri: str, window: list[dt.date], missing_days: list[str], empty_days: list[str],
                 allow_missing_days: bool, events_read: int | None) -> None:
    """Missing or empty window days are an error unless allowed (a day without impressions means its
    logging is broken or absent, not that nobody came); so is a window without any event
    (``events_read`` 0; None: not counted yet)."""
    if (missing_days or empty_days) and not allow_missing_days:
        problems = [f"missing partition(s) {missing_days}" if missing_days else "",
                    f"empty partition(s) {empty_days}" if empty_days else ""]
        raise IngestError(f"{raw_uri}: {'; '.join(p for p in problems if p)} in window {window[0]}..{window[-1]}; "
                          "pass allow_missing_days (--allow-missing-days) to ingest the rest")
    if events_read == 0:
        raise IngestError(f"{raw_uri}: no events in window {window[0]}..{window[-1]}")


def _with_event_columns(events: pd.DataFrame, key: str, spec: DatasetSpec) -> pd.DataFrame:
    """Every expected column present (absent ones as nulls, so the checks below can flag them) and
    the impression key under its canonical name, whatever the spec calls it."""
    for column in EVENT_FIELDS + (key,) + spec.features:
        if column not in events:
            events[column] = None
    return events.rename(columns={key: "impression_id"}) if key != "impression_id" else events


def _drop_malformed(events: pd.DataFrame, steps: list[str], quarantine: Quarantine) -> pd.DataFrame:
    """Rule 2 (event part): required fields present, a known event type, a parseable time (as ``t``)."""
    required = list(EVENT_FIELDS) + ["impression_id"]
    lacking = events[required].isna()
    missing = lacking.any(axis=1).to_numpy()
    quarantine.add("missing_field", events[missing],
                   lacking[missing].apply(lambda r: "missing " + ",".join(r.index[r]), axis=1))
    events = events[~missing]
    known_type = events["event_type"].isin([IMPRESSION] + steps).to_numpy()
    quarantine.add("bad_value", events[~known_type], "unknown event_type")
    events = events[known_type]
    times, ok = _parse_times(events["event_time"])
    quarantine.add("bad_value", events[~ok], "event_time is not ISO-8601 UTC")
    return events[ok].assign(t=times[ok])


def prepare_events(events: pd.DataFrame, key: str, spec: DatasetSpec, quarantine: Quarantine) -> pd.DataFrame:
    """Rule 2 (event part) on events as read: row-local, so it applies file by file."""
    return _drop_malformed(_with_event_columns(events, key, spec), list(spec.labels), quarantine)


def _by_arrival(events: pd.DataFrame) -> pd.DataFrame:
    """Events in order of arrival: partition, then file, then position in the file. The order is a
    property of each row, so any part of the events sorts the same way (the Beam shards do)."""
    if len(events) < 2:
        return events
    partition, _ = pd.factorize(events["partition"], sort=True)
    source, _ = pd.factorize(events["source"], sort=True)
    order = np.lexsort((events["row"].to_numpy(), events["line"].to_numpy(), source, partition))
    return events if (np.diff(order) > 0).all() else events.iloc[order]  # sorted already: no copy


def drop_duplicate_ids(events: pd.DataFrame, quarantine: Quarantine, seen: SeenKeys | None = None) -> pd.DataFrame:
    """Rule 3, first half: a redelivered event_id; the first to arrive wins. Needs every event of an
    event_id in ``events``, or, when the events come part by part in order of arrival, the ids of the
    earlier parts in ``seen`` (this part's first arrivals are added to it)."""
    events = _by_arrival(events)
    dup_id = _repeated(events["event_id"], seen)
    quarantine.add("duplicate_event", events[dup_id], "event_id seen before")
    return events[~dup_id]


def _drop_duplicate_steps(events: pd.DataFrame, quarantine: Quarantine, seen: SeenKeys | None = None) -> pd.DataFrame:
    """Rule 3, second half: a second event of one step for one impression; the first to arrive wins.
    ``seen``: as for :func:`drop_duplicate_ids`, for impression events coming part by part (their
    step is the impression itself, so the key is the impression id)."""
    events = _by_arrival(events)
    if seen is None:
        dup_step = events.duplicated(["impression_id", "event_type"], keep="first").to_numpy()
    else:
        assert (events["event_type"] == IMPRESSION).all(), "seen keys are impression ids: impression events only"
        dup_step = _repeated(events["impression_id"], seen)
    quarantine.add("duplicate_event", events[dup_step], "second event of this step for the impression")
    return events[~dup_step]


def _repeated(keys: pd.Series, seen: SeenKeys | None) -> np.ndarray:
    """Rows whose key came before: earlier in ``keys`` (in order) or in an earlier part (``seen``)."""
    repeated = keys.duplicated(keep="first").to_numpy()
    if seen is not None and len(keys):
        repeated[np.flatnonzero(~repeated)[seen.remember(keys[~repeated])]] = True
    return repeated


class SeenKeys:
    """The keys (event ids, impression ids) of the parts read so far, as 128-bit hashes (two keyed
    64-bit SipHashes): 16 bytes a key instead of a Python string, so deduplicating across a whole
    window costs little memory when it is read day by day. Two different keys are taken for one
    only if both hashes collide (about n^2 / 2^129: never in practice)."""

    def __init__(self) -> None:
        self.first = np.zeros(0, np.uint64)   # sorted
        self.second = np.zeros(0, np.uint64)  # aligned with ``first``

    def remember(self, keys: pd.Series) -> np.ndarray:
        """Which of ``keys`` (distinct) came in an earlier part; the others are remembered."""
        h1, h2 = _hash128(keys)
        order = np.argsort(h1)  # sorted needles: the binary searches walk the array in order
        h1, h2 = h1[order], h2[order]
        lo = np.searchsorted(self.first, h1)
        same_first, seen = np.zeros(len(h1), bool), np.zeros(len(h1), bool)
        if len(self.first):
            at = np.minimum(lo, len(self.first) - 1)
            same_first = (lo < len(self.first)) & (self.first[at] == h1)
            seen = same_first & (self.second[at] == h2)
        for k in np.flatnonzero(same_first & ~seen):  # the first hash alone collides: look further
            hi = np.searchsorted(self.first, h1[k], "right")
            seen[k] = bool((self.second[lo[k]:hi] == h2[k]).any())
        self.first = np.insert(self.first, lo[~seen], h1[~seen])
        self.second = np.insert(self.second, lo[~seen], h2[~seen])
        out = np.empty(len(seen), bool)
        out[order] = seen
        return out

    def __len__(self) -> int:
        return len(self.first)


def _hash128(keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    values = keys.to_numpy(dtype=object)
    return (pd.util.hash_array(values, hash_key="apem-ingest-key1", categorize=False),
            pd.util.hash_array(values, hash_key="apem-ingest-key2", categorize=False))


def _drop_bad_features(imps: pd.DataFrame, spec: DatasetSpec, quarantine: Quarantine) -> tuple[pd.DataFrame, set]:
    """Rule 2 (feature part): an impression with a missing categorical or an unparseable number is
    quarantined with the first problem found in it. Returns the kept impressions and the ids of the
    quarantined ones."""
    bad_rows = np.zeros(len(imps), bool)
    is_missing = np.zeros(len(imps), bool)  # else the value does not parse
    why = np.full(len(imps), "", object)    # the first problem found in each bad row
    for name in spec.features:
        bad = _bad_feature(imps[name], name in spec.categorical)
        first = bad & ~bad_rows
        why[first] = f"missing {name}" if name in spec.categorical else f"{name} is not a number"
        is_missing[first] = name in spec.categorical
        bad_rows |= bad
    for reason, rows in (("missing_field", bad_rows & is_missing), ("bad_value", bad_rows & ~is_missing)):
        quarantine.add(reason, imps[rows], pd.Series(why[rows], index=imps.index[rows]))
    return imps[~bad_rows], set(imps["impression_id"][bad_rows])


def unattributed_follow_ups(follow: pd.DataFrame, rejected_ids: set, start: dt.date, end: dt.date,
                            quarantine: Quarantine) -> int:
    """Rule 4 for follow-ups whose impression is not a kept one of the window: quarantined (their
    impression was quarantined, or there is none in the window), except those of the look-ahead
    without one, which are the next window's business: only counted. Returns that count."""
    rejected = follow["impression_id"].isin(rejected_ids).to_numpy()
    follow_in_window = follow["partition"].between(start, end).to_numpy()
    quarantine.add("unknown_impression", follow[rejected], "its impression was quarantined")
    unknown = ~rejected & follow_in_window
    quarantine.add("unknown_impression", follow[unknown], "no impression event with this id in the window")
    return int((~rejected & ~follow_in_window).sum())


def _timely_follow_ups(follow: pd.DataFrame, imps: pd.DataFrame, attribution_window_days: int,
                       quarantine: Quarantine) -> pd.DataFrame:
    """Rule 5 for follow-ups of the kept impressions ``imps``: keep those within the attribution window."""
    imp_time = pd.Series(imps["t"].to_numpy(), index=imps["impression_id"].to_numpy())
    lag = follow["t"].to_numpy() - imp_time.reindex(follow["impression_id"]).to_numpy()
    late = lag > np.timedelta64(attribution_window_days, "D")
    quarantine.add("late_beyond_window", follow[late],
                   f"more than {attribution_window_days} day(s) after the impression")
    return follow[~late]


def _funnel_order(imps: pd.DataFrame, follow: pd.DataFrame, steps: list[str],
                  quarantine: Quarantine) -> tuple[np.ndarray, np.ndarray]:
    """Rule 6: each step needs the one before it, no earlier than it; a broken impression goes whole,
    since its labels cannot be trusted. Returns (step present per impression and step, rows kept)."""
    times_matrix = np.full((len(imps), len(steps)), np.datetime64("NaT"), "datetime64[us]")
    if len(follow):
        step_time = follow.pivot(index="impression_id", columns="event_type", values="t").reindex(
            index=imps["impression_id"].to_numpy(), columns=steps)
        times_matrix = step_time.to_numpy(dtype="datetime64[us]")
    present = ~np.isnat(times_matrix)
    previous = np.concatenate([imps["t"].to_numpy(dtype="datetime64[us]")[:, None], times_matrix[:, :-1]], axis=1)
    previous_present = np.concatenate([np.ones((len(imps), 1), bool), present[:, :-1]], axis=1)
    skipped = present & ~previous_present
    too_early = present & previous_present & (times_matrix < previous)
    broken = (skipped | too_early).any(axis=1)
    if broken.any():
        detail = [
            "; ".join([f"{steps[k]} without {([IMPRESSION] + steps)[k]}" for k in np.flatnonzero(s)]
                      + [f"{steps[k]} before {([IMPRESSION] + steps)[k]}" for k in np.flatnonzero(e)])
            for s, e in zip(skipped[broken], too_early[broken])
        ]
        quarantine.add("out_of_order_steps", imps[broken], pd.Series(detail, index=imps.index[broken]))
    return present, ~broken


@dataclass
class Resolved:
    """What rules 3 to 6 make of the events of a set of impressions: the kept rows (key, time,
    features as text, 0/1 labels), the typing flags of the window's impressions, and the events
    that belong to the next window (counted, not quarantined)."""

    rows: pd.DataFrame
    kinds: dict
    out_of_window: int


def screen_impressions(imps: pd.DataFrame, spec: DatasetSpec,
                       quarantine: Quarantine) -> tuple[dict, pd.DataFrame, set]:
    """The window's impressions (steps deduplicated) through rule 2's feature part: their typing
    flags (taken before the checks), the kept impressions and the ids of the quarantined ones."""
    kinds = feature_kinds(imps, spec)
    imps, rejected_ids = _drop_bad_features(imps, spec, quarantine)
    return kinds, imps, rejected_ids


def impression_rows(imps: pd.DataFrame, follow: pd.DataFrame, spec: DatasetSpec, attribution_window_days: int,
                    quarantine: Quarantine) -> pd.DataFrame:
    """Rules 5 and 6 for kept impressions and their follow-ups (steps deduplicated): the rows (key,
    time, features as text, 0/1 labels). Each impression's row depends on its own events alone."""
    follow = _timely_follow_ups(follow, imps, attribution_window_days, quarantine)
    present, keep = _funnel_order(imps, follow, list(spec.labels), quarantine)
    rows = imps.loc[keep, ["impression_id", "t", *spec.features]]
    for k, step in enumerate(spec.labels):
        rows[step] = present[keep, k].astype(np.int8)
    return rows


def resolve_impressions(events: pd.DataFrame, spec: DatasetSpec, start: dt.date, end: dt.date,
                        attribution_window_days: int, quarantine: Quarantine) -> Resolved:
    """Rules 3 (steps) to 6 on events deduplicated by id. Needs every event of an impression id in
    ``events``: the Beam ingest passes one shard of ids (the single-process ingest applies the same
    rules day by day, :func:`ingest`)."""
    events = _drop_duplicate_steps(events, quarantine)
    # Impressions come from the window only; those of the look-ahead belong to the next window.
    is_imp = (events["event_type"] == IMPRESSION).to_numpy()
    in_window = events["partition"].between(start, end).to_numpy()
    kinds, imps, rejected_ids = screen_impressions(events[is_imp & in_window], spec, quarantine)
    follow = events[~is_imp]
    known = follow["impression_id"].isin(imps["impression_id"]).to_numpy()
    unknown_ahead = unattributed_follow_ups(follow[~known], rejected_ids, start, end, quarantine)
    rows = impression_rows(imps, follow[known], spec, attribution_window_days, quarantine)
    return Resolved(rows, kinds, int((is_imp & ~in_window).sum()) + unknown_ahead)


def typed_table(rows: pd.DataFrame, kinds: dict, key: str, spec: DatasetSpec) -> pa.Table:
    """Kept rows as the dataset's table: typed features (typing rule, from the window's ``kinds``),
    int8 labels, sorted by time then key."""
    table = pa.table({
        key: pa.array(rows["impression_id"].to_numpy(dtype=object), pa.string()),
        spec.time_column: pa.array(rows["t"].to_numpy(dtype="datetime64[us]"), pa.timestamp("us")),
        **{name: _typed_feature(rows[name], name in spec.categorical,
                                _as_int64(kinds[name], name in spec.categorical)) for name in spec.features},
        **{step: pa.array(rows[step].to_numpy(np.int8)) for step in spec.labels},
    })
    return table.take(pc.sort_indices(table, [(spec.time_column, "ascending"), (key, "ascending")]))


def window_days(start: dt.date | str, end: dt.date | str, attribution_window_days: int,
                file_format: str | None) -> tuple[list[dt.date], list[dt.date]]:
    """The window's days and the look-ahead days after it (checked arguments; bad ones raise)."""
    start, end = _checked_arguments(start, end, attribution_window_days, file_format)
    window = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    lookahead = [end + dt.timedelta(days=i) for i in range(1, attribution_window_days + 1)]
    return window, lookahead


def claim_outputs(raw_uri: str, out: str, overwrite: bool) -> None:
    """Refuse, before any work, a dataset or quarantine path that holds something else (ownership rules)."""
    for path, kind in ((out, DATASET_DIR), (quarantine_path(out), QUARANTINE_DIR)):
        claim_output(path, kind, inputs=(raw_uri,), overwrite=overwrite)


def ingest_summary(counts: dict, window: list[dt.date], lookahead: list[dt.date], out: str,
                   attribution_window_days: int) -> dict:
    """The summary (``ingest.json``) from the run's counts: rows, label_sums, quarantine (by reason),
    missing_days, empty_days, events_read, out_of_window, ignored_files."""
    rows = counts["rows"]
    return {
        "rows": rows,
        "quarantine": {reason: counts["quarantine"].get(reason, 0) for reason in QUARANTINE_REASONS},
        "quarantined": sum(counts["quarantine"].values()),
        "days": [d.isoformat() for d in window],
        "lookahead_days": [d.isoformat() for d in lookahead],
        "missing_days": counts["missing_days"],
        "empty_days": counts["empty_days"],
        "events_read": counts["events_read"],
        "out_of_window": counts["out_of_window"],
        "ignored_files": counts["ignored_files"],
        "attribution_window_days": attribution_window_days,
        "label_rates": {s: n / rows if rows else 0.0 for s, n in counts["label_sums"].items()},
        "dataset": out,
        "quarantine_path": quarantine_path(out),
    }


def check_usable(summary: dict, raw_uri: str, window: list[dt.date]) -> None:
    """No kept row is an error (raised once the quarantine and summary say why)."""
    if summary["rows"] == 0:
        raise IngestError(f"{raw_uri}: no usable impressions in window {window[0]}..{window[-1]}; "
                          f"quarantine counts {summary['quarantine']} (see {summary['quarantine_path']})")


ROWS_PER_FILE = 1_000_000  # rows per part file of the dataset, as apem.data.spec.write_dataset lays them out
STAGED_DIR = "_impressions"  # inside the dataset's staging: the screened impressions beyond the memory budget
# The screened impressions held in memory between the two passes, at most (estimated, _estimated_bytes).
# 1M impressions (14 days) are estimated at 0.53 GB: they stay in memory, which saves their round trip
# through disk (from_pandas, lz4 write, read, to_pandas: ~7 s of ~45 s CPU); a larger window spills
# the rest, so its memory stays bounded (benchmarks/bench_ingest.py has the figures).
STAGE_MEMORY_BYTES = 768 * 2**20
_NOT_STAGED = ["row", "partition"]  # bookkeeping that only the first pass needs (arrival order)


@dataclass
class _WindowPass:
    """What the day-by-day pass carries from one day to the next. Small next to a day's events:
    hashed ids, the follow-up events (a few percent of all), the quarantined impressions' ids, and
    the screened impressions by the date of their event time: frames in memory up to
    ``memory_budget`` bytes (estimated), beyond it lz4 Arrow files in ``scratch``."""

    window: list[dt.date]
    scratch: str
    memory_budget: int = STAGE_MEMORY_BYTES
    event_ids: SeenKeys = field(default_factory=SeenKeys)
    impression_ids: SeenKeys = field(default_factory=SeenKeys)
    follow: list = field(default_factory=list)
    rejected_ids: set = field(default_factory=set)
    kinds: dict = field(default_factory=dict)  # the typing flags, merged over the days
    staged: dict = field(default_factory=dict)  # event date -> frames or files, in order of arrival
    staged_bytes: int = 0  # of the frames held in memory
    missing_days: list = field(default_factory=list)
    empty_days: list = field(default_factory=list)
    events_read: int = 0
    out_of_window: int = 0


def _screen_day(state: _WindowPass, day: dt.date, frame: pd.DataFrame, key: str, spec: DatasetSpec,
                quarantine: Quarantine) -> None:
    """Rules 2, 3 and 2's feature part for one day's events, deduplicated against the earlier days
    (hashed ids). Follow-ups are kept for later; the window's screened impressions are staged."""
    events = drop_duplicate_ids(prepare_events(frame, key, spec, quarantine), quarantine, state.event_ids)
    is_imp = (events["event_type"] == IMPRESSION).to_numpy()
    state.follow.append(events[~is_imp])
    imps = _drop_duplicate_steps(events[is_imp], quarantine, state.impression_ids)
    if day not in state.window:  # the look-ahead's impressions belong to the next window
        state.out_of_window += len(imps)
        return
    kinds, imps, rejected_ids = screen_impressions(imps, spec, quarantine)
    state.kinds = merge_feature_kinds(state.kinds, kinds) if state.kinds else kinds
    state.rejected_ids |= rejected_ids
    _stage(state, day, imps.drop(columns=_NOT_STAGED))


def _stage(state: _WindowPass, day: dt.date, imps: pd.DataFrame) -> None:
    """Keep one arrival day's screened impressions for the second pass, split by event date: in
    memory while the budget allows, else on disk (the same rows either way: the output does not
    depend on the budget)."""
    dates = imps["t"].to_numpy().astype("datetime64[D]")
    row_bytes = _estimated_bytes(imps) / max(1, len(imps))
    for date in np.unique(dates):
        part = imps[dates == date]
        size = int(row_bytes * len(part))
        if state.staged_bytes + size <= state.memory_budget:
            state.staged_bytes += size
        else:
            path = os.path.join(state.scratch, f"{date}_{day.isoformat()}.arrow")
            feather.write_feather(pa.Table.from_pandas(part, preserve_index=False), path, compression="lz4")
            part = path
        state.staged.setdefault(str(date), []).append(part)


def _unstaged(entries: list) -> pd.DataFrame:
    """The staged impressions of one event date, in order of arrival, as one frame."""
    frames = [e if isinstance(e, pd.DataFrame) else feather.read_table(e).to_pandas() for e in entries]
    return pd.concat(frames, ignore_index=True, sort=False)


def _estimated_bytes(frame: pd.DataFrame, sample_rows: int = 500) -> int:
    """Memory a frame holds, estimated from an evenly spaced sample of its rows: 8 bytes a cell,
    plus the Python objects of each object column: scaled to the frame where most of the sample's
    objects are distinct (ids, times, numbers as text), counted once where they repeat (a small
    vocabulary: Arrow's to_pandas makes equal strings one object). Cheap and deterministic."""
    rows = len(frame)
    if rows == 0:
        return 0
    sample = frame.iloc[::max(1, rows // sample_rows)]
    total = 8 * rows * frame.shape[1]
    for column in frame.columns:
        values = sample[column].to_numpy()
        if values.dtype != object:
            continue
        distinct = {id(v): sys.getsizeof(v) for v in values}
        held = sum(distinct.values())
        total += held * rows / len(values) if 2 * len(distinct) > len(values) else held
    return int(total)


def _read_days(raw_uri: str, days: list[dt.date], file_format: str | None, key: str, spec: DatasetSpec,
               quarantine: Quarantine, ignored: list[str], state: _WindowPass) -> None:
    """Rule 1 and the partitions, one day at a time in order of arrival, each day screened as read.
    Notes the window's missing and empty days (a day without impressions means its logging is
    broken or absent, not that nobody came)."""
    for day in days:
        frame = _read_partition(raw_uri, day, file_format, quarantine, ignored)
        if day in state.window and frame is None:
            state.missing_days.append(day.isoformat())
        elif day in state.window and impression_count(frame) == 0:
            state.empty_days.append(day.isoformat())
        if frame is not None and len(frame):
            state.events_read += len(frame)
            _screen_day(state, day, frame, key, spec, quarantine)


class _PartWriter:
    """The dataset's part files laid out as :func:`apem.data.spec.write_dataset` does (``ROWS_PER_FILE``
    rows each, in order), written as the rows come, so the window's rows are never held at once."""

    def __init__(self, directory: str, spec: DatasetSpec) -> None:
        self.directory, self.spec, self.pending, self.parts, self.rows = directory, spec, [], 0, 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        while sum(t.num_rows for t in self.pending) >= ROWS_PER_FILE:
            self._flush()

    def close(self) -> None:
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        rows = pa.concat_tables(self.pending)
        chunk = rows.slice(0, ROWS_PER_FILE)
        validate_schema(self.spec, chunk.schema, "table to write")
        pq.write_table(chunk, os.path.join(self.directory, f"part-{self.parts:05d}.parquet"))
        self.parts += 1
        self.pending = [rows.slice(ROWS_PER_FILE)] if rows.num_rows > ROWS_PER_FILE else []


def _write_rows(state: _WindowPass, key: str, spec: DatasetSpec, attribution_window_days: int,
                quarantine: Quarantine, writer: _PartWriter) -> tuple[pd.DataFrame, dict, list]:
    """Rules 3 (follow-up steps), 5 and 6, one event date of impressions at a time, dates in order,
    so the parts come out sorted by time then key as one sort of the window would give. Returns
    the follow-ups no kept impression claimed, the label sums and the dataset's key columns."""
    follow = _drop_duplicate_steps(pd.concat(state.follow, ignore_index=True, sort=False), quarantine)
    state.follow = []
    claimed = np.zeros(len(follow), bool)
    label_sums, ids = dict.fromkeys(spec.labels, 0), []
    for date in sorted(state.staged):
        imps = _unstaged(state.staged.pop(date))  # popped: the memory of the dates done is freed as we go
        theirs = follow["impression_id"].isin(imps["impression_id"]).to_numpy()
        claimed |= theirs
        rows = impression_rows(imps, follow[theirs], spec, attribution_window_days, quarantine)
        table = typed_table(rows, state.kinds, key, spec)
        writer.write(table)
        ids.append(table.column(key))
        for step in spec.labels:
            label_sums[step] += int(rows[step].sum())
    writer.close()
    return follow[~claimed], label_sums, ids


def ingest(raw_uri: str, start: dt.date, end: dt.date, out: str, spec: DatasetSpec | None = None,
           attribution_window_days: int = 3, allow_missing_days: bool = False,
           file_format: str | None = None, overwrite: bool = False,
           stage_memory_bytes: int = STAGE_MEMORY_BYTES) -> dict:
    """Ingest the partitions ``[start, end]`` of ``raw_uri`` into a dataset at ``out`` (local or gs://);
    the quarantine goes to :func:`quarantine_path` (``out + "_quarantine"``). Returns the summary.
    The stages follow the rules of the module docstring; only an earlier dataset and quarantine
    (or anything, with ``overwrite``) are replaced, never the raw input. One process reads the
    window a day at a time, so its memory follows a day's events, not the window's: ids are
    deduplicated across days by hash, the screened impressions wait for the follow-ups of every day
    (in memory up to ``stage_memory_bytes``, beyond it as lz4 Arrow files in the output's staging,
    removed before publishing), and the dataset is written one event date at a time, in the order
    and part files of one sort.
    :mod:`apem.dataplane.ingest_beam` applies the same rules on Apache Beam."""
    claim_outputs(raw_uri, out, overwrite)
    spec = spec or default_spec()
    key = spec.id_column or DEFAULT_KEY
    window, lookahead = window_days(start, end, attribution_window_days, file_format)
    quarantine, ignored = Quarantine(), []
    with storage.local_output(out) as staging:
        state = _WindowPass(window, os.path.join(staging, STAGED_DIR), stage_memory_bytes)
        os.makedirs(state.scratch)
        _read_days(raw_uri, window + lookahead, file_format, key, spec, quarantine, ignored, state)
        state.event_ids = state.impression_ids = None  # every day is read: the seen ids are done with
        check_window(raw_uri, window, state.missing_days, state.empty_days, allow_missing_days, state.events_read)
        writer = _PartWriter(staging, spec)
        unclaimed, label_sums, ids = _write_rows(state, key, spec, attribution_window_days, quarantine, writer)
        shutil.rmtree(state.scratch)
        unknown_ahead = unattributed_follow_ups(unclaimed, state.rejected_ids, window[0], window[-1], quarantine)
        counts = {"rows": writer.rows, "quarantine": quarantine.counts(), "missing_days": state.missing_days,
                  "empty_days": state.empty_days, "events_read": state.events_read,
                  "out_of_window": state.out_of_window + unknown_ahead, "ignored_files": ignored,
                  "label_sums": label_sums}
        summary = ingest_summary(counts, window, lookahead, out, attribution_window_days)
        _write_quarantine(quarantine, summary)
        check_usable(summary, raw_uri, window)
        spec.write(staging)
        open(os.path.join(staging, storage.SUCCESS_MARKER), "wb").close()  # a dataset apem wrote (replaceable)
    carry_oracle(raw_uri, out, ids)
    return summary


def _write_quarantine(quarantine: Quarantine, summary: dict) -> None:
    sink = io.BytesIO()
    pq.write_table(quarantine.table(), sink)
    storage.write_bytes(storage.join(summary["quarantine_path"], QUARANTINE_FILE), sink.getvalue())
    storage.write_bytes(storage.join(summary["quarantine_path"], SUMMARY_FILE), json.dumps(summary, indent=2).encode())


def carry_oracle(raw_uri: str, out: str, ids: list) -> None:
    """Synthetic logs keep their truth under RAW/oracle/truth.parquet: give the dataset its rows, so
    the split and the experiments can compute oracle AUCs. Training never reads it. ``ids``: the
    dataset's id columns (one per part file, or one for all)."""
    source = storage.join(raw_uri, ORACLE_DIR, ORACLE_FILE)
    if not storage.exists(source):
        return
    oracle = pq.read_table(io.BytesIO(storage.read_bytes(source)))
    if DEFAULT_KEY not in oracle.column_names:
        return
    wanted = pa.concat_arrays([(part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part)
                               .cast(pa.string()) for part in ids])
    subset = oracle.filter(pc.is_in(oracle.column(DEFAULT_KEY), value_set=wanted))
    sink = io.BytesIO()
    pq.write_table(subset, sink)
    storage.write_bytes(storage.join(out, ORACLE_DIR, ORACLE_FILE), sink.getvalue())
    generator = storage.join(raw_uri, *GENERATOR_PATH)
    if storage.exists(generator):  # how the truth was made, for the attainable reference
        storage.write_bytes(storage.join(out, *GENERATOR_PATH), storage.read_bytes(generator))
