"""Raw event logs for the synthetic funnel: what the ingestion step reads.

Layout (``apem synth --format events``)::

    out/dt=YYYY-MM-DD/events.jsonl     (or events.csv / events.parquet)
    out/oracle/truth.parquet           the true P(T_i=1|X) keyed by impression_id
    out/events.json                    what was written, including how much mess was injected

Each line is one event: ``event_id``, ``event_type`` (impression, click, authorize, convert),
``event_time`` (UTC, ``YYYY-MM-DDTHH:MM:SS``) and ``impression_id``; impression events also carry
the feature fields. A day's partition holds the events that *arrived* that day. The realistic mess:

- follow-up steps happen minutes to days after the impression, so they land in later partitions,
  and a few conversions fall outside a 3-day attribution window
- a few events arrive one or two days late
- some events are delivered twice (same ``event_id``), possibly in different partitions
- a few impressions lack a feature field, a few click events are lost (authorize without click)
- each partition has a few unparsable lines (JSONL and CSV)

Everything is vectorized (numpy/pandas/pyarrow); 1M impressions take seconds.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from apem.data import storage
from apem.data.features import CATEGORICAL, LABELS, NUMERICAL
from apem.data.oracle import GENERATOR_FILE, ORACLE_DIR, ORACLE_FILE
from apem.data.ownership import EVENTS_DIR, claim_output
from apem.research.synth import SynthConfig, generate, generator_record

FILE_FORMATS = ("jsonl", "csv", "parquet")
IMPRESSION = "impression"
BASE_FIELDS = ("event_id", "event_type", "event_time", "impression_id")
FEATURE_FIELDS = CATEGORICAL + NUMERICAL
PARTITION_PREFIX = "dt="
# Mean delay (seconds) from the previous funnel step: clicks within minutes, conversions within a day or so.
STEP_DELAY_MEAN_S = {"click": 600.0, "authorize": 6 * 3600.0, "convert": 16 * 3600.0}


@dataclass(frozen=True)
class EventMess:
    """How much realistic mess to inject (fractions of events unless named otherwise)."""

    late_arrival: float = 0.02          # arrives 1-2 days after it happened
    duplicate: float = 0.005            # delivered twice
    missing_field: float = 0.0005       # impressions with one categorical field null
    lost_click: float = 0.02            # of authorized impressions: the click event never arrives
    unparsable_per_partition: int = 3   # garbage lines per partition (jsonl/csv only)


def partition_name(day: dt.date) -> str:
    return f"{PARTITION_PREFIX}{day.isoformat()}"


def _garbage_lines(rng: np.random.Generator, n: int, file_format: str, n_columns: int) -> list[str]:
    if file_format == "jsonl":
        choices = ['{"event_id": "trunc', "not json at all", "[1, 2, 3]", '{"event_type": "click",']
    else:
        choices = ["garbled,line", ",".join(["x"] * (n_columns + 2))]
    return [choices[i] for i in rng.integers(0, len(choices), n)]


def _impression_events(table: pa.Table, rng: np.random.Generator, mess: EventMess, imp_ids: np.ndarray,
                       t0: np.ndarray) -> tuple[pd.DataFrame, int]:
    """One impression event per row with its features; a few lose a string categorical (the
    ingestion step must quarantine them). Returns the events and how many lost a field."""
    n = table.num_rows
    impressions = table.select(["impression_id"] + list(FEATURE_FIELDS)).to_pandas()
    for column in FEATURE_FIELDS:  # nullable ints stay ints once follow-up events (no features) join
        if pd.api.types.is_integer_dtype(impressions[column]):
            impressions[column] = impressions[column].astype("Int64")
    impressions.insert(0, "event_time", t0)
    impressions.insert(0, "event_type", IMPRESSION)
    impressions.insert(0, "event_id", imp_ids + "-" + IMPRESSION)
    n_missing = int(rng.binomial(n, mess.missing_field))
    missing_rows = rng.choice(n, n_missing, replace=False)
    string_fields = [c for c in CATEGORICAL if impressions[c].dtype == object]
    for row, column in zip(missing_rows, rng.choice(string_fields, n_missing)):
        impressions.iat[row, impressions.columns.get_loc(column)] = None
    return impressions, n_missing


def _follow_up_events(table: pa.Table, rng: np.random.Generator, mess: EventMess, imp_ids: np.ndarray,
                      t0: np.ndarray) -> tuple[list[pd.DataFrame], int, int]:
    """Events of the funnel steps that happened, each some delay after the step before it, so they
    land in later partitions; a few clicks of authorized impressions are lost. Returns the event
    frames (one per step), the lost clicks, and the conversions more than 3 days after the impression."""
    n = table.num_rows
    frames = []
    prev_time = t0
    n_beyond_window = 0
    lost_clicks = 0
    authorized = table.column("authorize").to_numpy().astype(bool)
    for step in LABELS:
        happened = table.column(step).to_numpy().astype(bool)
        delay = rng.exponential(STEP_DELAY_MEAN_S[step], n).astype("int64") + 1
        step_time = prev_time + delay.astype("timedelta64[s]")
        keep = happened.copy()
        if step == "click":
            lost = authorized & (rng.random(n) < mess.lost_click)
            keep &= ~lost
            lost_clicks = int(lost.sum())
        if step == LABELS[-1]:
            n_beyond_window = int((happened & (step_time - t0 > np.timedelta64(3, "D"))).sum())
        frames.append(pd.DataFrame({
            "event_id": imp_ids[keep] + "-" + step,
            "event_type": step,
            "event_time": step_time[keep],
            "impression_id": imp_ids[keep],
        }))
        prev_time = step_time
    return frames, lost_clicks, n_beyond_window


def _arrive(events: pd.DataFrame, rng: np.random.Generator, mess: EventMess,
            start: dt.date) -> tuple[pd.DataFrame, int, int]:
    """Set each event's arrival ``partition`` (day index): the day it happened, a day or two later
    for a few, and deliver a few twice (the copy possibly a day later). Returns the events, the late
    arrivals and the duplicates."""
    first_day = np.datetime64(start.isoformat(), "D")
    arrival_lag = np.where(rng.random(len(events)) < mess.late_arrival, rng.integers(1, 3, len(events)), 0)
    happened_day = (events["event_time"].to_numpy().astype("datetime64[D]") - first_day).astype("int64")
    events["partition"] = happened_day + arrival_lag
    dup = rng.random(len(events)) < mess.duplicate
    dups = events[dup].copy()
    dups["partition"] += rng.integers(0, 2, len(dups))
    events = pd.concat([events, dups], ignore_index=True)
    return events, int((arrival_lag > 0).sum()), int(dup.sum())


def build_events(config: SynthConfig, mess: EventMess = EventMess()) -> tuple[pd.DataFrame, pa.Table, dict]:
    """All events as one DataFrame (columns: base fields, features, ``partition`` day index), the
    oracle table, and counts of the injected mess.

    The mess has its own generator (seeded from ``config.seed``) so the clean funnel stays that of
    :func:`generate`; its draws go in a fixed order (impressions, steps, arrival) for repeatable logs."""
    table, oracle = generate(config)
    rng = np.random.default_rng(config.seed + 7_919)
    imp_ids = table.column("impression_id").to_numpy().astype(object)
    t0 = table.column("event_time").to_numpy().astype("datetime64[s]")
    impressions, n_missing = _impression_events(table, rng, mess, imp_ids, t0)
    steps, lost_clicks, n_beyond_window = _follow_up_events(table, rng, mess, imp_ids, t0)
    events = pd.concat([impressions] + steps, ignore_index=True, sort=False)
    events, n_late, n_duplicate = _arrive(events, rng, mess, config.start)
    counts = {
        "late_arrival": n_late,
        "duplicate": n_duplicate,
        "missing_field": n_missing,
        "lost_click": lost_clicks,
        "convert_beyond_3_days": n_beyond_window,
    }
    return events, oracle, counts


def _encode_partition(part: pd.DataFrame, file_format: str, garbage: list[str]) -> bytes:
    part = part.drop(columns="partition")
    times = part["event_time"].to_numpy().astype("datetime64[s]")
    part = part.assign(event_time=np.datetime_as_string(times, unit="s"))
    if file_format == "parquet":
        return _parquet_bytes(pa.Table.from_pandas(part, preserve_index=False))
    if file_format == "csv":
        text = part.to_csv(index=False, lineterminator="\n")
        return (text + "".join(line + "\n" for line in garbage)).encode()
    is_impression = (part["event_type"] == IMPRESSION).to_numpy()
    chunks = [
        part[is_impression].to_json(orient="records", lines=True, double_precision=15),
        part.loc[~is_impression, list(BASE_FIELDS)].to_json(orient="records", lines=True, double_precision=15),
    ]
    body = "".join(c.strip("\n") + "\n" for c in chunks if c.strip())
    return (body + "".join(line + "\n" for line in garbage)).encode()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_synthetic_events(config: SynthConfig, out: str, file_format: str = "jsonl",
                           mess: EventMess = EventMess(), overwrite: bool = False) -> dict:
    """Write daily partitions of raw events (local path or gs:// URI) plus the oracle; return a summary.
    Only earlier synthetic events (or anything, with ``overwrite``) are replaced."""
    claim_output(out, EVENTS_DIR, overwrite=overwrite)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    events, oracle, counts = build_events(config, mess)
    rng = np.random.default_rng(config.seed + 104_729)
    events = events.sort_values(["partition", "event_time"], kind="stable")
    order = events["partition"].to_numpy()
    bounds = np.searchsorted(order, np.arange(order.max() + 2))
    partitions = []
    n_garbage = 0
    for day_index in range(int(order.max()) + 1):
        part = events.iloc[bounds[day_index]:bounds[day_index + 1]]
        garbage = [] if file_format == "parquet" else _garbage_lines(
            rng, mess.unparsable_per_partition, file_format, len(events.columns))
        n_garbage += len(garbage)
        day = config.start + dt.timedelta(days=day_index)
        uri = storage.join(out, partition_name(day), f"events.{file_format}")
        storage.write_bytes(uri, _encode_partition(part, file_format, garbage))
        partitions.append(partition_name(day))
    storage.write_bytes(storage.join(out, ORACLE_DIR, ORACLE_FILE), _parquet_bytes(oracle))
    storage.write_bytes(storage.join(out, ORACLE_DIR, GENERATOR_FILE), generator_record(config).encode())
    counts["unparsable_line"] = n_garbage
    summary = {
        "impressions": oracle.num_rows,
        "events": int(len(events)),
        "events_by_type": {k: int(v) for k, v in events["event_type"].value_counts().items()},
        "format": file_format,
        "first_day": config.start.isoformat(),
        "impression_days": config.days,
        "partitions": partitions,
        "mess": counts,
        "mess_config": asdict(mess),
        "oracle": storage.join(out, ORACLE_DIR, ORACLE_FILE),
    }
    storage.write_bytes(storage.join(out, "events.json"), json.dumps(summary, indent=2).encode())
    return summary
