import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from apem.cli.main import main as apem_main
from apem.research.synth import SynthConfig, generate
from apem.research.synth_events import EventMess, build_events, write_synthetic_events

CONFIG = SynthConfig(rows=3000, days=5, seed=11)


def _read_jsonl(path):
    good, bad = [], 0
    for line in open(path):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            good.append(record)
        else:
            bad += 1
    return good, bad


def test_layout_partitions_oracle_and_summary(tmp_path):
    out = tmp_path / "raw"
    assert apem_main(["synth", "--rows", "3000", "--days", "5", "--seed", "11", "--out", str(out),
                      "--format", "events"]) == 0
    summary = json.load(open(out / "events.json"))
    assert summary["partitions"][0] == "dt=2026-01-01" and len(summary["partitions"]) > CONFIG.days  # late tail
    assert sorted(p for p in os.listdir(out) if p.startswith("dt=")) == summary["partitions"]
    oracle = pq.read_table(out / "oracle" / "truth.parquet")
    assert oracle.num_rows == CONFIG.rows and "p_convert" in oracle.column_names

    events, garbage = [], 0
    for part in summary["partitions"]:
        good, bad = _read_jsonl(out / part / "events.jsonl")
        events += [dict(e, partition=part[3:]) for e in good]
        garbage += bad
    assert garbage == summary["mess"]["unparsable_line"] == 3 * len(summary["partitions"])
    frame = pd.DataFrame(events)
    assert len(frame) == summary["events"]
    # features only on impressions
    imp = frame[frame.event_type == "impression"]
    assert imp["user_id"].notna().mean() > 0.99 and frame.loc[frame.event_type != "impression", "user_id"].isna().all()
    # late arrivals: a partition later than the day the event happened
    assert (frame["partition"] > frame["event_time"].str[:10]).sum() > 0
    assert (frame["partition"] >= frame["event_time"].str[:10]).all()
    # duplicates share the event id
    assert frame["event_id"].duplicated().sum() == summary["mess"]["duplicate"] > 0


def test_events_follow_the_funnel_with_increasing_times():
    events, _, counts = build_events(CONFIG, EventMess(duplicate=0.0, lost_click=0.0, missing_field=0.0))
    table, _ = generate(CONFIG)
    by_type = events.groupby("event_type").size()
    for step in ("click", "authorize", "convert"):
        assert by_type[step] == int(np.asarray(table.column(step)).sum())
    assert by_type["impression"] == CONFIG.rows and counts["duplicate"] == 0
    times = events.pivot(index="impression_id", columns="event_type", values="event_time")
    for earlier, later in (("impression", "click"), ("click", "authorize"), ("authorize", "convert")):
        both = times[earlier].notna() & times[later].notna()
        assert (times.loc[both, later] > times.loc[both, earlier]).all()
    beyond = (times["convert"] - times["impression"]) > pd.Timedelta(days=3)
    assert counts["convert_beyond_3_days"] == int(beyond.sum())


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_other_file_formats(tmp_path, file_format):
    config = SynthConfig(rows=400, days=2, seed=1)
    summary = write_synthetic_events(config, str(tmp_path), file_format=file_format)
    path = tmp_path / summary["partitions"][0] / f"events.{file_format}"
    if file_format == "parquet":
        table = pq.read_table(path)
        assert summary["mess"]["unparsable_line"] == 0 and table.schema.field("position").type == "int64"
    else:
        lines = open(path).read().splitlines()
        assert lines[0].startswith("event_id,event_type,event_time,impression_id,user_id")
        assert summary["mess"]["unparsable_line"] == 3 * len(summary["partitions"])
        pd.read_csv(io.StringIO("\n".join(lines[:-3])))  # everything but the injected garbage parses
    with pytest.raises(ValueError, match="file_format"):
        write_synthetic_events(config, str(tmp_path / "x"), file_format="xml")
