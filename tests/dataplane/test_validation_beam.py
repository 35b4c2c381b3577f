"""TFDV statistics on Beam (the Parquet read batch by batch) against the in-memory statistics."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from apem.cli.main import main as apem_main
from apem.data.features import default_spec
from apem.data.spec import write_dataset
from apem.dataplane.validation import DEFAULT_SCHEMA, compute_statistics, validate_dataset
from apem.dataplane.validation_beam import compute_statistics_beam
from apem.research.synth import SynthConfig, generate

IN_MEMORY = ["--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three part files (so Beam reads several batches), missing incomes (NaN), a bad channel value."""
    table, _ = generate(SynthConfig(rows=3000, days=6, seed=2))
    channel = table.column("channel").to_pylist()
    channel[:4] = ["fax"] * 4
    table = table.set_column(table.schema.get_field_index("channel"), "channel", pa.array(channel))
    path = str(tmp_path_factory.mktemp("stats") / "data")
    write_dataset(table, default_spec(), path, rows_per_file=1100)
    return path


def _by_name(stats):
    return {".".join(f.path.step): f for f in stats.datasets[0].features}


def test_beam_statistics_equal_the_in_memory_statistics(dataset, tmp_path):
    local = compute_statistics(dataset)
    beam = compute_statistics_beam(dataset, str(tmp_path / "stats.pb"), pipeline_args=IN_MEMORY)
    assert beam.datasets[0].num_examples == local.datasets[0].num_examples == 3000
    got, want = _by_name(beam), _by_name(local)
    assert sorted(got) == sorted(want) and "impression_id" not in got
    assert want["income"].num_stats.common_stats.num_missing > 0  # NaN counts as missing in both
    for name, expected in want.items():
        actual = got[name]
        if expected.HasField("num_stats"):
            e, a = expected.num_stats, actual.num_stats
            assert a.common_stats.num_non_missing == e.common_stats.num_non_missing, name
            np.testing.assert_allclose([a.mean, a.std_dev, a.min, a.max], [e.mean, e.std_dev, e.min, e.max],
                                       rtol=1e-6, err_msg=name)
        else:
            e, a = expected.string_stats, actual.string_stats
            assert a.common_stats.num_non_missing == e.common_stats.num_non_missing, name
            assert a.unique == e.unique, name
            assert [(v.value, v.frequency) for v in a.top_values] == [(v.value, v.frequency) for v in e.top_values]


def test_cli_validate_on_beam_finds_the_same_anomalies(dataset, tmp_path):
    local = validate_dataset(dataset, out_dir=str(tmp_path / "local"), warn_only=True)
    assert [a["feature"] for a in local["anomalies"]] == ["channel"]
    code = apem_main(["validate", "--data", dataset, "--schema", DEFAULT_SCHEMA, "--out", str(tmp_path / "beam"),
                      "--engine", "beam", *IN_MEMORY])
    assert code == 1  # anomalies: non-zero exit, as with the local engine
    with open(tmp_path / "beam" / "anomalies.json") as fh:
        beam = json.load(fh)
    assert beam["anomalies"] == local["anomalies"] and beam["examples"] == local["examples"]


def test_the_apem_command_exits_0_after_clean_beam_statistics_with_stderr_not_a_terminal(tmp_path):
    """The console script (its exit path after a Beam pipeline flushes stderr after logging.shutdown())
    with stderr to a pipe, as under cron or CI: a clean dataset exits 0 with the stream still open
    (absl's logging handler closed the real stderr through TFDV's import-time stderr filter: exit 1)."""
    table, _ = generate(SynthConfig(rows=600, days=3, seed=3))
    data = str(tmp_path / "data")
    write_dataset(table, default_spec(), data)
    done = subprocess.run([sys.executable, "-m", "apem.cli.main", "validate", "--data", data, "--out",
                           str(tmp_path / "report"), "--warn-only", "--engine", "beam", *IN_MEMORY],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lost sys.stderr" not in done.stderr and (tmp_path / "report" / "stats.pb").exists()


def test_the_local_engine_reads_a_large_dataset_batch_by_batch(dataset, tmp_path, monkeypatch):
    """From ``BATCHED_STATISTICS_ROWS`` rows the local engine computes the statistics batch by batch
    in this process (TFDV's PTransform writes them to ``stats_uri``, which the one-DataFrame path
    never does), with the same results; below it, from one DataFrame."""
    from apem.dataplane import validation_beam

    want = _by_name(compute_statistics(dataset))
    small = validation_beam.statistics_for("local")(dataset, str(tmp_path / "small.pb"))
    assert not (tmp_path / "small.pb").exists() and small.datasets[0].num_examples == 3000
    monkeypatch.setattr(validation_beam, "BATCHED_STATISTICS_ROWS", 3000)
    batched = validation_beam.statistics_for("local")(dataset, str(tmp_path / "large.pb"))
    assert (tmp_path / "large.pb").exists() and batched.datasets[0].num_examples == 3000
    got = _by_name(batched)
    assert sorted(got) == sorted(want)
    for name in ("income", "credit_score"):
        np.testing.assert_allclose(got[name].num_stats.mean, want[name].num_stats.mean, rtol=1e-6)
    assert got["channel"].string_stats.unique == want["channel"].string_stats.unique
