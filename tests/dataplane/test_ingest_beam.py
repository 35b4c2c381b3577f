"""The Beam ingest against the single-process ingest (the reference): the same dataset and the same
quarantine, row for row and reason for reason, on DirectRunner."""

import datetime as dt
import io
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from apem.cli.main import main as apem_main
from apem.data import storage
from apem.dataplane.ingest import QUARANTINE_FILE, IngestError, ingest, quarantine_path
from apem.dataplane.ingest_beam import ingest_beam
from apem.research.synth import SynthConfig
from apem.research.synth_events import write_synthetic_events
from raw_events import event, write_day, write_files_lacking_a_feature, write_files_with_nested_values

DAY1, DAY2, DAY3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)
IN_MEMORY = ["--direct_running_mode=in_memory"]
_event = event


def _write(root, day, name, lines):
    write_day(root, day, lines, name=name)


def _plain(frame):
    """Categories as plain values: their order follows the order of the part files."""
    frame = frame.astype({c: object for c, t in frame.dtypes.items() if isinstance(t, pd.CategoricalDtype)})
    return frame.sort_values("impression_id").reset_index(drop=True)


def _dataset(path):
    return _plain(storage.read_dataset_at(path).table.to_pandas())


def _quarantine(path):
    frame = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(quarantine_path(path), QUARANTINE_FILE))))
    frame = frame.to_pandas()
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def _assert_same_ingest(reference_out, beam_out, reference, beam):
    pd.testing.assert_frame_equal(_dataset(beam_out), _dataset(reference_out), check_exact=True)
    pd.testing.assert_frame_equal(_quarantine(beam_out), _quarantine(reference_out), check_exact=True)
    paths = ("dataset", "quarantine_path")
    assert {k: v for k, v in beam.items() if k in reference and k not in paths} == \
        {k: v for k, v in reference.items() if k not in paths}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_ingest")
    config = SynthConfig(rows=2500, days=6, seed=5)
    write_synthetic_events(config, str(root / "raw"))
    end = config.start + dt.timedelta(days=config.days - 2)  # the last day is look-ahead
    reference = ingest(str(root / "raw"), config.start, end, str(root / "reference"))
    return root, config, end, reference


def test_beam_ingest_equals_the_reference_on_synthetic_logs(synthetic):
    root, config, end, reference = synthetic
    # several shards of each key (one process: worker processes cost ~30 s to start on 2 busy cores)
    beam = ingest_beam(str(root / "raw"), config.start, end, str(root / "beam"), shards=4, pipeline_args=IN_MEMORY)
    assert beam["engine"] == "beam" and beam["shards"] == 4 and reference["rows"] > 2000
    assert reference["quarantined"] > 0 and reference["out_of_window"] > 0
    _assert_same_ingest(str(root / "reference"), str(root / "beam"), reference, beam)
    # the oracle travels with the dataset, as with the reference
    assert pq.read_table(str(root / "beam" / "oracle" / "truth.parquet")).num_rows == reference["rows"]
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]  # no staging left behind


@pytest.fixture
def messy(tmp_path):
    """Duplicates (same id, same id on another impression, a second click; across files of a day),
    late follow-ups, funnel-order violations, an unknown impression, events of the next window."""
    raw = str(tmp_path / "raw")
    _write(raw, DAY1, "a.jsonl", [
        _event("good", "impression", "2026-01-01T10:00:00"),
        _event("good", "click", "2026-01-01T10:01:00"),
        _event("good", "click", "2026-01-01T10:01:00"),                                   # same event id
        _event("good", "click", "2026-01-01T10:02:00", event_id="another-click"),         # second click
        _event("other", "impression", "2026-01-01T10:00:00", event_id="good-impression"),  # id of another
        _event("skip", "impression", "2026-01-01T14:00:00"),
        _event("skip", "authorize", "2026-01-01T15:00:00"),                               # no click
        _event("early", "impression", "2026-01-01T16:00:00"),
        _event("early", "click", "2026-01-01T15:59:00"),                                  # before impression
        _event("slow", "impression", "2026-01-01T20:00:00"),
        _event("ghost", "click", "2026-01-01T13:00:00"),                                  # unknown impression
        _event("nochan", "impression", "2026-01-01T11:00:00", channel=None),              # missing_field
        _event("badnum", "impression", "2026-01-01T11:00:00", balance="lots"),            # bad_value
        '{"event_id": "broken',
    ])
    _write(raw, DAY1, "b.jsonl", [
        _event("good", "authorize", "2026-01-01T12:00:00"),
        _event("good", "click", "2026-01-01T10:03:00", event_id="another-click"),         # redelivered, 2nd file
    ])
    _write(raw, DAY2, "a.jsonl", [
        _event("good", "convert", "2026-01-02T09:00:00"),
        _event("slow", "click", "2026-01-03T21:00:00"),                                   # late (1 day window)
        _event("late2", "impression", "2026-01-02T08:00:00"),
        _event("late2", "click", "2026-01-02T08:30:00"),
    ])
    _write(raw, DAY3, "a.jsonl", [                                                         # look-ahead day
        _event("late2", "authorize", "2026-01-03T09:30:00"),                              # late (> 1 day)
        _event("next", "impression", "2026-01-03T09:00:00"),                              # next window's
        _event("nextghost", "click", "2026-01-03T09:00:00"),                              # next window's
    ])
    return raw


def test_beam_ingest_equals_the_reference_on_duplicates_late_events_and_funnel_breaks(messy, tmp_path):
    reference = ingest(messy, DAY1, DAY2, str(tmp_path / "reference"), attribution_window_days=1)
    assert all(count > 0 for count in reference["quarantine"].values()), reference["quarantine"]
    assert reference["quarantine"]["duplicate_event"] == 4 and reference["quarantine"]["late_beyond_window"] == 2
    assert reference["out_of_window"] == 2
    beam = ingest_beam(messy, DAY1, DAY2, str(tmp_path / "beam"), attribution_window_days=1, shards=3,
                       pipeline_args=IN_MEMORY)
    _assert_same_ingest(str(tmp_path / "reference"), str(tmp_path / "beam"), reference, beam)


def test_beam_ingest_refuses_missing_and_empty_days_and_publishes_nothing(messy, tmp_path):
    with pytest.raises(IngestError, match=r"missing partition\(s\) \['2026-01-04'\]"):
        ingest_beam(messy, DAY1, dt.date(2026, 1, 4), str(tmp_path / "a"), pipeline_args=IN_MEMORY)
    _write(messy, dt.date(2026, 1, 4), "a.jsonl", [_event("ghost2", "click", "2026-01-04T10:00:00")])
    with pytest.raises(IngestError, match=r"empty partition\(s\) \['2026-01-04'\]"):
        ingest_beam(messy, DAY1, dt.date(2026, 1, 4), str(tmp_path / "b"), pipeline_args=IN_MEMORY)
    assert sorted(os.listdir(tmp_path)) == ["raw"]  # no output, no quarantine, no staging


def test_cli_ingest_on_beam_to_gcs(messy, tmp_path, gcs_prefix):
    out = storage.join(gcs_prefix, "dataset")
    args = ["ingest", "--raw", messy, "--start", "2026-01-01", "--end", "2026-01-02", "--out", out,
            "--attribution-days", "1"]
    assert apem_main(args + ["--engine", "beam", *IN_MEMORY]) == 0
    reference = ingest(messy, DAY1, DAY2, str(tmp_path / "reference"), attribution_window_days=1)
    assert storage.is_complete(out)
    pd.testing.assert_frame_equal(_dataset(out), _dataset(str(tmp_path / "reference")), check_exact=True)
    summary = json.loads(storage.read_bytes(storage.join(quarantine_path(out), "ingest.json")))
    assert summary["quarantine"] == reference["quarantine"]
    # a missing day (found before Beam starts), and Beam options without the Beam engine: exit 2
    missing = ["ingest", "--raw", messy, "--start", "2026-01-01", "--end", "2026-01-05", "--out", str(tmp_path / "m")]
    assert apem_main(missing + ["--engine", "beam"]) == 2 and not (tmp_path / "m").exists()
    assert apem_main(args[:-2] + ["--attribution-days", "1", "--out", str(tmp_path / "x"),
                                  "--direct_num_workers=2"]) == 2


@pytest.mark.parametrize("write_files, reasons, rows", [
    (write_files_lacking_a_feature, {"missing_field": 3}, 2),
    (write_files_with_nested_values, {"bad_value": 1}, 3),
], ids=["lacking_a_feature_column", "nested_and_binary_values"])
def test_beam_ingest_equals_the_reference_on_files_of_one_day_that_differ(tmp_path, write_files, reasons, rows):
    """Files of one day with different columns (one lacks a feature), or with list, struct, JSON-object
    and non-UTF-8 binary values: the same quarantined and kept rows on Beam, each file read by its own
    worker, as in the single-process ingest."""
    raw = str(tmp_path / "raw")
    write_files(raw, DAY1)
    reference = ingest(raw, DAY1, DAY1, str(tmp_path / "reference"))
    assert {k: reference["quarantine"][k] for k in reasons} == reasons and reference["rows"] == rows
    beam = ingest_beam(raw, DAY1, DAY1, str(tmp_path / "beam"), shards=2, pipeline_args=IN_MEMORY)
    _assert_same_ingest(str(tmp_path / "reference"), str(tmp_path / "beam"), reference, beam)
