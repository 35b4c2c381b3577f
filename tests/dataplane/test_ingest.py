import datetime as dt
import io
import json

import numpy as np
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from apem.data import storage
from apem.cli.main import main as apem_main
from apem.dataplane.ingest import QUARANTINE_FILE, QUARANTINE_REASONS, IngestError, ingest, quarantine_path
from apem.data.spec import read_dataset
from apem.data.oracle import read_generator, read_oracle
from apem.research.synth import SynthConfig, generate
from apem.research.synth_events import write_synthetic_events
from raw_events import event, write_day, write_files_lacking_a_feature, write_files_with_nested_values

DAY1, DAY2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)
_event, _write_day = event, write_day


@pytest.fixture
def handmade(tmp_path):
    """Two days of events with exactly one instance of each problem (two of out_of_order_steps)."""
    raw = str(tmp_path / "raw")
    _write_day(raw, DAY1, [
        _event("good", "impression", "2026-01-01T10:00:00"),
        _event("good", "click", "2026-01-01T10:01:00"),
        _event("good", "authorize", "2026-01-01T12:00:00"),
        _event("good", "click", "2026-01-01T10:01:00"),                          # duplicate_event (same id)
        _event("nochan", "impression", "2026-01-01T11:00:00", channel=None),      # missing_field
        json.dumps({"event_type": "click", "event_time": "2026-01-01T11:00", "impression_id": "noid"}),  # missing_field
        _event("badtime", "impression", "yesterday"),                             # bad_value
        _event("ghost", "click", "2026-01-01T13:00:00"),                          # unknown_impression
        _event("skip", "impression", "2026-01-01T14:00:00"),
        _event("skip", "authorize", "2026-01-01T15:00:00"),                       # out_of_order: no click
        _event("early", "impression", "2026-01-01T16:00:00"),
        _event("early", "click", "2026-01-01T15:59:00"),                          # out_of_order: before impression
        '{"event_id": "broken',                                                    # unparsable_line
        _event("slow", "impression", "2026-01-01T20:00:00"),
    ])
    _write_day(raw, DAY2, [
        _event("plain", "impression", "2026-01-02T08:00:00", position="1"),  # JSON type varies: Python path
        _event("good", "convert", "2026-01-02T09:00:00"),                         # late arrival, within window
        _event("slow", "click", "2026-01-03T21:00:00"),                           # late_beyond_window (1 day)
    ])
    return raw


def test_each_bad_input_gets_its_reason_and_count(handmade, tmp_path):
    out = str(tmp_path / "ds")
    summary = ingest(handmade, DAY1, DAY2, out, attribution_window_days=1)
    assert summary["quarantine"] == {
        "unparsable_line": 1, "missing_field": 2, "bad_value": 1, "duplicate_event": 1,
        "unknown_impression": 1, "late_beyond_window": 1, "out_of_order_steps": 2,
    }
    assert summary["rows"] == 3 and summary["quarantine_path"] == quarantine_path(out) == out + "_quarantine"
    ds = read_dataset(out)
    rows = {r["impression_id"]: r for r in ds.table.to_pylist()}
    assert set(rows) == {"good", "plain", "slow"}
    assert [rows["good"][s] for s in ("click", "authorize", "convert")] == [1, 1, 1]
    assert [rows["slow"][s] for s in ("click", "authorize", "convert")] == [0, 0, 0]
    assert np.isnan(rows["plain"]["income"]) and rows["plain"]["position"] == 1
    q = pq.read_table(storage.join(summary["quarantine_path"], QUARANTINE_FILE)).to_pandas()
    by_id = dict(zip(q["impression_id"], q["reason"]))
    assert by_id["nochan"] == "missing_field" and by_id["ghost"] == "unknown_impression"
    assert by_id["skip"] == by_id["early"] == "out_of_order_steps"
    assert "authorize without click" in q.loc[q.impression_id == "skip", "detail"].iat[0]
    assert "click before impression" in q.loc[q.impression_id == "early", "detail"].iat[0]
    bad_line = q[q.reason == "unparsable_line"].iloc[0]
    assert bad_line["line"] == 13 and bad_line["source"].endswith("dt=2026-01-01/events.jsonl")
    assert bad_line["raw"] == '{"event_id": "broken'
    assert "missing event_id" in q.loc[q.impression_id == "noid", "detail"].iat[0]
    # every reason keeps what arrived, not only unparsable lines
    assert q["raw"].notna().all() and (q["raw"] != "").all()
    assert json.loads(q.loc[q.impression_id == "badtime", "raw"].iat[0])["event_time"] == "yesterday"


def test_missing_and_empty_partitions_are_errors_unless_allowed(handmade, tmp_path):
    with pytest.raises(IngestError, match=r"missing partition\(s\) \['2026-01-03'\]"):
        ingest(handmade, DAY1, dt.date(2026, 1, 3), str(tmp_path / "a"))
    summary = ingest(handmade, DAY1, dt.date(2026, 1, 3), str(tmp_path / "a"), allow_missing_days=True)
    assert summary["missing_days"] == ["2026-01-03"] and summary["rows"] > 0
    storage.write_bytes(storage.join(handmade, "dt=2026-01-03", "events.jsonl"), b"")
    with pytest.raises(IngestError, match="empty partition"):
        ingest(handmade, DAY1, dt.date(2026, 1, 3), str(tmp_path / "b"))
    assert apem_main(["ingest", "--raw", handmade, "--start", "2026-01-01", "--end", "2026-01-05",
                      "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("events")
    config = SynthConfig(rows=2500, days=6, seed=5)
    summaries = {fmt: write_synthetic_events(config, str(root / fmt), file_format=fmt)
                 for fmt in ("jsonl", "csv", "parquet")}
    return root, config, summaries


def _frame(path):
    return read_dataset(path).table.to_pandas().sort_values("impression_id").reset_index(drop=True)


def test_synthetic_events_roundtrip_to_the_generated_dataset(synthetic, tmp_path):
    root, config, summaries = synthetic
    mess = summaries["jsonl"]["mess"]
    out = str(tmp_path / "ds")
    summary = ingest(str(root / "jsonl"), config.start, config.start + dt.timedelta(days=config.days - 1), out)
    q = summary["quarantine"]
    assert set(q) == set(QUARANTINE_REASONS)
    assert q["unparsable_line"] == mess["unparsable_line"] > 0
    assert q["missing_field"] == mess["missing_field"]
    assert q["duplicate_event"] == mess["duplicate"] > 0
    assert q["out_of_order_steps"] == mess["lost_click"]
    assert q["late_beyond_window"] == mess["convert_beyond_3_days"]
    # every impression is a row, or quarantined, or out of this window (it arrived after the last day)
    assert summary["rows"] + q["missing_field"] + q["out_of_order_steps"] <= config.rows
    table, _ = generate(config)
    truth = table.to_pandas().set_index("impression_id")
    got = _frame(out).set_index("impression_id")
    truth = truth.loc[got.index]
    for column in ("click", "authorize", "product_type", "position", "balance", "event_time"):
        assert (got[column].astype(str) == truth[column].astype(str)).all(), column
    assert (got["convert"] != truth["convert"]).sum() <= q["late_beyond_window"]
    np.testing.assert_allclose(got["income"], truth["income"], rtol=1e-12)
    oracle = read_oracle(out)  # the truth travels with the dataset, row for row
    assert sorted(oracle.column("impression_id").to_pylist()) == sorted(got.index)
    assert read_generator(out) == read_generator(str(root / "jsonl"))  # and so does how it was made
    assert read_generator(out)["config"]["seed"] == config.seed


def test_csv_and_parquet_ingest_like_jsonl(synthetic, tmp_path):
    root, config, _ = synthetic
    end = config.start + dt.timedelta(days=2)
    frames = {}
    for fmt in ("jsonl", "csv", "parquet"):
        summary = ingest(str(root / fmt), config.start, end, str(tmp_path / fmt), file_format=fmt)
        frames[fmt] = (_frame(str(tmp_path / fmt)), summary["quarantine"])
    jsonl, q_jsonl = frames["jsonl"]
    for fmt in ("csv", "parquet"):
        frame, q = frames[fmt]
        assert frame.dtypes.astype(str).to_dict() == jsonl.dtypes.astype(str).to_dict(), fmt
        assert frame.astype(str).equals(jsonl.astype(str)), fmt
        expected = dict(q_jsonl, unparsable_line=q_jsonl["unparsable_line"] if fmt == "csv" else 0)
        assert q == expected, fmt


def test_ingest_from_gcs_equals_local(synthetic, gcs_prefix, tmp_path):
    root, config, _ = synthetic
    raw_gcs = storage.join(gcs_prefix, "raw")
    write_synthetic_events(config, raw_gcs)
    end = config.start + dt.timedelta(days=3)
    local = ingest(str(root / "jsonl"), config.start, end, str(tmp_path / "local"))
    remote_out = storage.join(gcs_prefix, "dataset")
    remote = ingest(raw_gcs, config.start, end, remote_out)
    assert remote["quarantine"] == local["quarantine"] and remote["rows"] == local["rows"]
    assert storage.exists(storage.join(remote_out, storage.SUCCESS_MARKER))
    remote_frame = storage.read_dataset_at(remote_out).table.to_pandas().sort_values("impression_id")
    assert remote_frame.reset_index(drop=True).astype(str).equals(_frame(str(tmp_path / "local")).astype(str))
    q_remote = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(remote["quarantine_path"], QUARANTINE_FILE))))
    assert q_remote.num_rows == sum(local["quarantine"].values())


def test_events_across_days_are_joined_and_deduplicated_as_over_the_whole_window(tmp_path, monkeypatch):
    """The ingest reads one day at a time: follow-ups that arrive on later days (even after the
    attribution window's look-ahead of their impression's day), an impression that arrives after its
    click, and ids repeated on other days must give what one pass over the whole window gives."""
    raw, day = str(tmp_path / "raw"), [dt.date(2026, 1, d) for d in range(1, 6)]
    _write_day(raw, day[0], [
        _event("a", "impression", "2026-01-01T10:00:00"),
        _event("dupe", "impression", "2026-01-01T08:00:00"),
        _event("c", "click", "2026-01-01T09:30:00"),                                      # before its impression arrives
    ])
    _write_day(raw, day[1], [
        _event("a", "click", "2026-01-02T09:00:00"),                                      # day D+1
        _event("dupe", "impression", "2026-01-01T08:00:00"),                              # same event id, next day
        _event("dupe", "impression", "2026-01-01T08:00:01", event_id="dupe-again"),      # second impression event
        _event("c", "impression", "2026-01-01T09:00:00"),                                 # arrives a day late
    ])
    _write_day(raw, day[2], [
        _event("a", "authorize", "2026-01-02T09:30:00"),                                  # happened D+1, arrives D+2
        _event("b", "impression", "2026-01-03T12:00:00"),
    ])
    _write_day(raw, day[3], [
        _event("a", "convert", "2026-01-02T09:45:00"),                                    # arrives D+3: beyond D+1
        _event("b", "click", "2026-01-03T12:30:00"),
        _event("d", "impression", "2026-01-04T07:00:00"),
    ])
    _write_day(raw, day[4], [                                                              # look-ahead
        _event("b", "authorize", "2026-01-04T11:00:00"),
        _event("b", "click", "2026-01-03T12:30:00"),                                      # redelivered click id
        _event("next", "impression", "2026-01-05T01:00:00"),                              # the next window's
    ])
    monkeypatch.setattr("apem.dataplane.ingest.ROWS_PER_FILE", 3)  # several part files, filled in order
    out = str(tmp_path / "ds")
    summary = ingest(raw, day[0], day[3], out, attribution_window_days=1)
    assert summary["quarantine"] == dict.fromkeys(QUARANTINE_REASONS, 0) | {"duplicate_event": 3}
    assert summary["out_of_window"] == 1 and summary["rows"] == 5
    table = read_dataset(out).table
    labels = {r["impression_id"]: (r["click"], r["authorize"], r["convert"]) for r in table.to_pylist()}
    assert labels == {"a": (1, 1, 1), "b": (1, 1, 0), "c": (1, 0, 0), "dupe": (0, 0, 0), "d": (0, 0, 0)}
    assert table.column("impression_id").to_pylist() == ["dupe", "c", "a", "b", "d"]  # by time, across parts
    assert [pq.read_metadata(f"{out}/part-0000{k}.parquet").num_rows for k in (0, 1)] == [3, 2]
    q = pq.read_table(storage.join(summary["quarantine_path"], QUARANTINE_FILE)).to_pandas()
    assert sorted(zip(q["event_id"], q["detail"])) == [
        ("b-click", "event_id seen before"), ("dupe-again", "second event of this step for the impression"),
        ("dupe-impression", "event_id seen before")]
    assert q.set_index("event_id").loc["dupe-impression", "source"].endswith("dt=2026-01-02/events.jsonl")


def _written(out, summary: dict) -> tuple:
    """What an ingest wrote, as bytes: its part files, its quarantine, and its summary (less its paths)."""
    parts = {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}
    quarantine = (out.parent / f"{out.name}_quarantine" / QUARANTINE_FILE).read_bytes()
    return parts, quarantine, {k: v for k, v in summary.items() if k not in ("dataset", "quarantine_path")}


def _ingest_on_disk(raw: str, start: dt.date, end: dt.date, out, *options: str) -> dict:
    """Ingest through the command with no memory for the staged impressions: every one spills."""
    assert apem_main(["ingest", "--raw", raw, "--start", start.isoformat(), "--end", end.isoformat(),
                      "--out", str(out), "--stage-memory-mb", "0", *options]) == 0
    return json.loads((out.parent / f"{out.name}_quarantine" / "ingest.json").read_text())


def test_staged_impressions_spilled_to_disk_give_the_same_output(handmade, synthetic, tmp_path, monkeypatch):
    """The screened impressions wait for the second pass in memory up to a budget, beyond it on disk:
    all in memory, all on disk and a mix must write the same part files, quarantine and summary,
    byte for byte. The handmade days' funnel-order quarantine is made in the second pass, from the
    staged rows (so every column must come back from disk); the synthetic days fill several parts."""
    real_write, spilled = feather.write_feather, []
    monkeypatch.setattr("apem.dataplane.ingest.feather.write_feather",
                        lambda table, path, **kw: (spilled.append(path), real_write(table, path, **kw)))
    memory = _written(tmp_path / "h1", ingest(handmade, DAY1, DAY2, str(tmp_path / "h1"), attribution_window_days=1))
    assert not spilled and memory[2]["quarantine"]["out_of_order_steps"] == 2
    disk = _written(tmp_path / "h2", _ingest_on_disk(handmade, DAY1, DAY2, tmp_path / "h2", "--attribution-days", "1"))
    assert spilled and disk == memory

    root, config, _ = synthetic
    monkeypatch.setattr("apem.dataplane.ingest.ROWS_PER_FILE", 700)  # several part files
    end = config.start + dt.timedelta(days=config.days - 2)
    spilled.clear()
    memory = _written(tmp_path / "s1", ingest(str(root / "jsonl"), config.start, end, str(tmp_path / "s1")))
    mixed = _written(tmp_path / "s2", ingest(str(root / "jsonl"), config.start, end, str(tmp_path / "s2"),
                                             stage_memory_bytes=600_000))
    spilled_mixed = len(spilled)
    disk = _written(tmp_path / "s3", _ingest_on_disk(str(root / "jsonl"), config.start, end, tmp_path / "s3"))
    assert len(memory[0]) == 3  # more than 1,400 rows
    assert 0 < spilled_mixed < len(spilled) - spilled_mixed
    assert disk == memory and mixed == memory
    assert not list(tmp_path.rglob("*.arrow"))  # the staging is gone


def _ingest_one_day_by_cli(write_files, tmp_path):
    """``apem ingest`` of the day ``write_files`` wrote (it must exit 0): the dataset path and the summary."""
    raw, out = str(tmp_path / "raw"), tmp_path / "ds"
    write_files(raw, DAY1)
    assert apem_main(["ingest", "--raw", raw, "--start", "2026-01-01", "--end", "2026-01-01",
                      "--out", str(out), "--attribution-days", "1"]) == 0
    return out, json.loads((tmp_path / "ds_quarantine" / "ingest.json").read_text())


def test_files_of_a_day_lacking_a_feature_column_quarantine_their_rows(tmp_path):
    """Files of one day with different columns: the rows of a file without a categorical column go
    to the quarantine as ``missing_field``, as a row without it in a single file does, and the rows
    without a numerical column keep NaN; never a traceback (the command exits 0)."""
    out, summary = _ingest_one_day_by_cli(write_files_lacking_a_feature, tmp_path)
    assert summary["quarantine"] == dict.fromkeys(QUARANTINE_REASONS, 0) | {"missing_field": 3, "unknown_impression": 2}
    rows = {r["impression_id"]: r for r in read_dataset(str(out)).table.to_pylist()}
    assert set(rows) == {"full", "noincome"} and rows["noincome"]["channel"] == "app"
    assert np.isnan(rows["noincome"]["income"]) and np.isnan(rows["noincome"]["balance"])
    q = pq.read_table(out.parent / "ds_quarantine" / QUARANTINE_FILE).to_pandas()
    missing = q[q.reason == "missing_field"].sort_values("impression_id")
    assert missing["impression_id"].tolist() == ["csvnochan", "jsonnochan", "pqnochan"]
    assert (missing["detail"] == "missing channel").all()
    assert [s.rsplit("/", 1)[1] for s in missing["source"]] == ["c.csv", "b.jsonl", "d.parquet"]


def test_nested_and_binary_values_are_read_as_text_in_every_format(tmp_path):
    """A list, struct or JSON-object value is read as its JSON text and checked like any other text (a
    list where a number is expected is a bad_value; an unused struct column is ignored), and bytes
    that are not UTF-8 are decoded with replacement characters: never a traceback (exit 0)."""
    out, summary = _ingest_one_day_by_cli(write_files_with_nested_values, tmp_path)
    assert summary["quarantine"] == dict.fromkeys(QUARANTINE_REASONS, 0) | {"bad_value": 1, "unknown_impression": 1}
    rows = {r["impression_id"]: r for r in read_dataset(str(out)).table.to_pylist()}
    assert set(rows) == {"pqlist", "jsonmeta", "badutf"} and all(r["click"] == 1 for r in rows.values())
    assert rows["pqlist"]["channel"] == '["app"]' and rows["badutf"]["region"] == "r\ufffd1"
    q = pq.read_table(out.parent / "ds_quarantine" / QUARANTINE_FILE).to_pandas()
    assert q.loc[q.reason == "bad_value", "impression_id"].tolist() == ["pqlistnum"]
