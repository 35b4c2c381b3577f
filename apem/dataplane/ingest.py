"""Ingestion: raw daily event partitions -> one funnel row per impression (a dataset of the contract).

Input: ``RAW/dt=YYYY-MM-DD/*.jsonl|*.csv|*.parquet`` (local or gs://), the layout of
:mod:`apem.research.synth_events`. A partition holds the events that *arrived* that day.

A window day without a partition is a *missing* day, one without impression events an *empty* day;
either is an :class:`IngestError` unless ``allow_missing_days``.

Rules, in order (every event that is not used ends up in the quarantine with a reason, or, for
events that belong to the next window, in the ``out_of_window`` count of the summary):

1. Lines that are not a JSON object / a CSV row of the header's width -> ``unparsable_line``.
2. Events lacking ``event_id``, ``event_type``, ``event_time`` or the impression key, and
   impressions lacking a categorical feature -> ``missing_field``. A value that does not parse
   (time, number, unknown event type) -> ``bad_value``. Null numericals are kept as NaN (the
   validation step checks their presence against the schema).
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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from apem.data import storage
from apem.data.features import default_spec
from apem.data.oracle import ORACLE_DIR, ORACLE_FILE
from apem.data.ownership import DATASET_DIR, QUARANTINE_DIR, claim_output
from apem.data.spec import DatasetSpec

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


_BOOKKEEPING_COLUMNS = ("source", "line", "partition", "t", "raw")


def _event_text(frame: pd.DataFrame) -> list[str]:
    """The event as read (its fields as text, JSON), for quarantined rows that parsed as records:
    the quarantine keeps what arrived for every reason, not only for unparsable lines."""
    fields = [c for c in frame.columns if c not in _BOOKKEEPING_COLUMNS]
    return [json.dumps({k: v for k, v in zip(fields, row) if isinstance(v, str)}, sort_keys=True)[:500]
            for row in frame[fields].itertuples(index=False, name=None)]


class _Quarantine:
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


def _as_strings(table: pa.Table) -> pa.Table:
    """Every column as nullable strings: one parse path for JSON, CSV and Parquet inputs."""
    columns = []
    for column in table.columns:
        if pa.types.is_timestamp(column.type):
            column = pc.strftime(column, format="%Y-%m-%dT%H:%M:%S")
        if pa.types.is_floating(column.type):  # keep "682.0" a float: no ".0" would read as an integer
            text = pc.cast(column, pa.string())
            whole = pc.fill_null(pc.match_substring_regex(text, _INT_RE), False)
            column = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
        columns.append(column if pa.types.is_string(column.type) else pc.cast(column, pa.string()))
    return pa.table(columns, names=table.column_names)


JSONL_CHUNK_LINES = 8192


def _read_jsonl(data: bytes, source: str, quarantine: _Quarantine) -> tuple[pa.Table, np.ndarray]:
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
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _read_csv(data: bytes, source: str, quarantine: _Quarantine) -> tuple[pa.Table, np.ndarray]:
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


def _read_partition(raw_uri: str, day: dt.date, file_format: str | None, quarantine: _Quarantine,
                    ignored: list[str]) -> pd.DataFrame | None:
    directory = storage.join(raw_uri, f"dt={day.isoformat()}")
    files = storage.list_files(directory)
    frames = []
    readable = [f for f in files if _file_format(f, file_format)]
    ignored.extend(f for f in files if f not in readable)
    if not readable:
        return None
    for uri in readable:
        data = storage.read_bytes(uri)
        kind = _file_format(uri, file_format)
        if kind == "jsonl":
            table, lines = _read_jsonl(data, uri, quarantine)
        elif kind == "csv":
            table, lines = _read_csv(data, uri, quarantine)
        else:
            table, lines = _read_parquet(data, uri)
        frame = table.to_pandas() if table.num_columns else pd.DataFrame(index=range(0))
        frame["source"] = uri
        frame["line"] = lines if len(lines) == len(frame) else -1
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True, sort=False)
    frame["partition"] = day
    return frame


def _matches(values: pd.Series, pattern: str) -> np.ndarray:
    arr = pa.array(values.to_numpy(dtype=object), pa.string())
    return pc.fill_null(pc.match_substring_regex(arr, pattern), False).to_numpy(zero_copy_only=False)


def _parse_times(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(datetime64[us] array, ok mask) for ISO-8601 UTC strings."""
    ok = _matches(values, _TIME_RE)
    text = values.where(ok, "1970-01-01T00:00:00").str.rstrip("Z").str.replace(" ", "T", regex=False)
    return text.to_numpy(dtype="datetime64[us]"), ok


def _typed_feature(values: pd.Series, categorical: bool) -> tuple[pa.Array, np.ndarray]:
    """(typed array, bad mask) following the module docstring's typing rule."""
    present = values.notna().to_numpy()
    is_int = _matches(values, _INT_RE)
    if categorical:
        if present.any() and is_int[present].all():
            return pa.array(values.where(present, None).to_numpy(dtype=object), pa.string()).cast(pa.int64()), ~present
        return pa.array(values.to_numpy(dtype=object), pa.string()), ~present
    if present.all() and is_int.all():
        return pa.array(values.to_numpy(dtype=object), pa.string()).cast(pa.int64()), np.zeros(len(values), bool)
    is_float = _matches(values, _FLOAT_RE)
    bad = present & ~is_float
    floats = pd.to_numeric(values.where(present & is_float, None), errors="coerce").to_numpy(np.float64)
    return pa.array(floats), bad


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


def _read_window(raw_uri: str, window: list[dt.date], lookahead: list[dt.date], file_format: str | None,
                 allow_missing_days: bool, quarantine: _Quarantine,
                 ignored: list[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Rule 1 and the partitions: read the window's and the look-ahead's partitions into one frame.
    Returns it with the window's missing and empty days, which are an error unless allowed (a day
    without impressions means its logging is broken or absent, not that nobody came)."""
    start, end = window[0], window[-1]
    frames, missing_days, empty_days = [], [], []
    for day in window + lookahead:
        frame = _read_partition(raw_uri, day, file_format, quarantine, ignored)
        if day in window and frame is None:
            missing_days.append(day.isoformat())
        elif day in window and not (frame.get("event_type", pd.Series(dtype=object)) == IMPRESSION).any():
            empty_days.append(day.isoformat())  # no impressions: the day's logging is broken or absent
        if frame is not None and len(frame):
            frames.append(frame)
    if (missing_days or empty_days) and not allow_missing_days:
        problems = [f"missing partition(s) {missing_days}" if missing_days else "",
                    f"empty partition(s) {empty_days}" if empty_days else ""]
        raise IngestError(f"{raw_uri}: {'; '.join(p for p in problems if p)} in window {start}..{end}; "
                          "pass allow_missing_days (--allow-missing-days) to ingest the rest")
    if not frames:
        raise IngestError(f"{raw_uri}: no events in window {start}..{end}")
    return pd.concat(frames, ignore_index=True, sort=False), missing_days, empty_days


def _with_event_columns(events: pd.DataFrame, key: str, spec: DatasetSpec) -> pd.DataFrame:
    """Every expected column present (absent ones as nulls, so the checks below can flag them) and
    the impression key under its canonical name, whatever the spec calls it."""
    for column in EVENT_FIELDS + (key,) + spec.features:
        if column not in events:
            events[column] = None
    return events.rename(columns={key: "impression_id"}) if key != "impression_id" else events


def _drop_malformed(events: pd.DataFrame, steps: list[str], quarantine: _Quarantine) -> pd.DataFrame:
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


def _drop_duplicates(events: pd.DataFrame, quarantine: _Quarantine) -> pd.DataFrame:
    """Rule 3: a redelivered event_id, or a second event of one step for one impression; the first
    to arrive wins, so the order is by arrival (partition, then position in the partition)."""
    events = events.sort_values(["partition", "source", "line"], kind="stable")
    dup_id = events.duplicated("event_id", keep="first").to_numpy()
    quarantine.add("duplicate_event", events[dup_id], "event_id seen before")
    events = events[~dup_id]
    dup_step = events.duplicated(["impression_id", "event_type"], keep="first").to_numpy()
    quarantine.add("duplicate_event", events[dup_step], "second event of this step for the impression")
    return events[~dup_step]


def _typed_features(imps: pd.DataFrame, spec: DatasetSpec,
                    quarantine: _Quarantine) -> tuple[pd.DataFrame, dict[str, pa.Array], set]:
    """Rule 2 (feature part): type each feature column; an impression with a missing categorical or
    an unparseable number is quarantined with the first problem found in it. Returns the kept
    impressions, their typed feature columns, and the ids of the quarantined ones."""
    columns: dict[str, pa.Array] = {}
    bad_rows = np.zeros(len(imps), bool)
    is_missing = np.zeros(len(imps), bool)  # else the value does not parse
    why = np.full(len(imps), "", object)    # the first problem found in each bad row
    for name in spec.features:
        array, bad = _typed_feature(imps[name], name in spec.categorical)
        columns[name] = array
        first = bad & ~bad_rows
        why[first] = f"missing {name}" if name in spec.categorical else f"{name} is not a number"
        is_missing[first] = name in spec.categorical
        bad_rows |= bad
    for reason, rows in (("missing_field", bad_rows & is_missing), ("bad_value", bad_rows & ~is_missing)):
        quarantine.add(reason, imps[rows], pd.Series(why[rows], index=imps.index[rows]))
    rejected_ids = set(imps["impression_id"][bad_rows])
    keep_imp = ~bad_rows
    columns = {name: array.filter(pa.array(keep_imp)) for name, array in columns.items()}
    return imps[keep_imp], columns, rejected_ids


def _attributed_follow_ups(follow: pd.DataFrame, imps: pd.DataFrame, rejected_ids: set, start: dt.date,
                           end: dt.date, attribution_window_days: int,
                           quarantine: _Quarantine) -> tuple[pd.DataFrame, int]:
    """Rules 4 and 5 for follow-ups: keep those of a kept impression, within the attribution window.
    An unknown impression in the look-ahead is the next window's business: only counted. Returns the
    kept follow-ups and that count."""
    imp_time = pd.Series(imps["t"].to_numpy(), index=imps["impression_id"].to_numpy())
    known = follow["impression_id"].isin(imp_time.index).to_numpy()
    rejected = follow["impression_id"].isin(rejected_ids).to_numpy()
    follow_in_window = follow["partition"].between(start, end).to_numpy()
    quarantine.add("unknown_impression", follow[~known & rejected], "its impression was quarantined")
    unknown = ~known & ~rejected & follow_in_window
    quarantine.add("unknown_impression", follow[unknown], "no impression event with this id in the window")
    out_of_window = int((~known & ~rejected & ~follow_in_window).sum())
    follow = follow[known]
    lag = follow["t"].to_numpy() - imp_time.reindex(follow["impression_id"]).to_numpy()
    late = lag > np.timedelta64(attribution_window_days, "D")
    quarantine.add("late_beyond_window", follow[late],
                   f"more than {attribution_window_days} day(s) after the impression")
    return follow[~late], out_of_window


def _funnel_order(imps: pd.DataFrame, follow: pd.DataFrame, steps: list[str],
                  quarantine: _Quarantine) -> tuple[np.ndarray, np.ndarray]:
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


def _funnel_table(imps: pd.DataFrame, columns: dict[str, pa.Array], present: np.ndarray, keep: np.ndarray,
                  key: str, spec: DatasetSpec) -> pa.Table:
    """One row per kept impression: key, time, typed features, 0/1 labels; sorted by time then key."""
    steps = list(spec.labels)
    table = pa.table({
        key: pa.array(imps["impression_id"].to_numpy(dtype=object)[keep], pa.string()),
        spec.time_column: pa.array(imps["t"].to_numpy(dtype="datetime64[us]")[keep], pa.timestamp("us")),
        **{name: array.filter(pa.array(keep)) for name, array in columns.items()},
        **{step: pa.array(present[keep, k].astype(np.int8)) for k, step in enumerate(steps)},
    })
    return table.take(pc.sort_indices(table, [(spec.time_column, "ascending"), (key, "ascending")]))


def ingest(raw_uri: str, start: dt.date, end: dt.date, out: str, spec: DatasetSpec | None = None,
           attribution_window_days: int = 3, allow_missing_days: bool = False,
           file_format: str | None = None, overwrite: bool = False) -> dict:
    """Ingest the partitions ``[start, end]`` of ``raw_uri`` into a dataset at ``out`` (local or gs://);
    the quarantine goes to :func:`quarantine_path` (``out + "_quarantine"``). Returns the summary.
    The stages follow the rules of the module docstring; only an earlier dataset and quarantine
    (or anything, with ``overwrite``) are replaced, never the raw input."""
    for path, kind in ((out, DATASET_DIR), (quarantine_path(out), QUARANTINE_DIR)):
        claim_output(path, kind, inputs=(raw_uri,), overwrite=overwrite)
    spec = spec or default_spec()
    key = spec.id_column or DEFAULT_KEY
    steps = list(spec.labels)
    start, end = _checked_arguments(start, end, attribution_window_days, file_format)
    quarantine = _Quarantine()
    ignored: list[str] = []
    window = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    lookahead = [end + dt.timedelta(days=i) for i in range(1, attribution_window_days + 1)]
    events, missing_days, empty_days = _read_window(raw_uri, window, lookahead, file_format,
                                                    allow_missing_days, quarantine, ignored)
    events_read = len(events)
    events = _drop_duplicates(_drop_malformed(_with_event_columns(events, key, spec), steps, quarantine), quarantine)

    # Impressions come from the window only; those of the look-ahead belong to the next window.
    is_imp = (events["event_type"] == IMPRESSION).to_numpy()
    in_window = events["partition"].between(start, end).to_numpy()
    imps, columns, rejected_ids = _typed_features(events[is_imp & in_window], spec, quarantine)
    follow, unknown_ahead = _attributed_follow_ups(events[~is_imp], imps, rejected_ids, start, end,
                                                   attribution_window_days, quarantine)
    out_of_window = int((is_imp & ~in_window).sum()) + unknown_ahead
    present, keep = _funnel_order(imps, follow, steps, quarantine)
    table = _funnel_table(imps, columns, present, keep, key, spec)

    q_path = quarantine_path(out)
    q_table = quarantine.table()
    sink = io.BytesIO()
    pq.write_table(q_table, sink)
    summary = {
        "rows": table.num_rows,
        "quarantine": quarantine.counts(),
        "quarantined": q_table.num_rows,
        "days": [d.isoformat() for d in window],
        "lookahead_days": [d.isoformat() for d in lookahead],
        "missing_days": missing_days,
        "empty_days": empty_days,
        "events_read": events_read,
        "out_of_window": out_of_window,
        "ignored_files": ignored,
        "attribution_window_days": attribution_window_days,
        "label_rates": {s: float(present[keep, k].mean()) if keep.any() else 0.0 for k, s in enumerate(steps)},
        "dataset": out,
        "quarantine_path": q_path,
    }
    storage.write_bytes(storage.join(q_path, QUARANTINE_FILE), sink.getvalue())
    storage.write_bytes(storage.join(q_path, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    if table.num_rows == 0:
        raise IngestError(f"{raw_uri}: no usable impressions in window {start}..{end}; "
                          f"quarantine counts {summary['quarantine']} (see {q_path})")
    storage.write_dataset_at(table, spec, out)
    _carry_oracle(raw_uri, out, table.column(key))
    return summary


def _carry_oracle(raw_uri: str, out: str, ids: pa.ChunkedArray) -> None:
    """Synthetic logs keep their truth under RAW/oracle/truth.parquet: give the dataset its rows, so
    the split and the experiments can compute oracle AUCs. Training never reads it."""
    source = storage.join(raw_uri, ORACLE_DIR, ORACLE_FILE)
    if not storage.exists(source):
        return
    oracle = pq.read_table(io.BytesIO(storage.read_bytes(source)))
    if DEFAULT_KEY not in oracle.column_names:
        return
    subset = oracle.filter(pc.is_in(oracle.column(DEFAULT_KEY), value_set=ids.combine_chunks().cast(pa.string())))
    sink = io.BytesIO()
    pq.write_table(subset, sink)
    storage.write_bytes(storage.join(out, ORACLE_DIR, ORACLE_FILE), sink.getvalue())
