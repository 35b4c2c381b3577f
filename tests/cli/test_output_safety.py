"""Issue 11, data loss: a command replaces only its own earlier output, never an input, never a
user's directory or file (one-line refusal naming the path, exit 2), and checks --out before work."""

import datetime as dt
import json
import os
import stat

import pyarrow.parquet as pq
import pytest

from apem.cli.main import main
from apem.data.atomic import atomic_file, remove_stale_staging, remove_stale_staging_under, scratch_dir, staged_dir
from apem.research.synth import SynthConfig
from apem.research.synth_events import write_synthetic_events
from cli_data import write_train_val


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    write_train_val(root, seed=3)
    return root


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def _train(data, out, *extra):
    return ["train", "--train", str(data / "train"), "--val", str(data / "val"), "--model", "shared_bottom",
            "--out", str(out), "--epochs", "1", "--batch-size", "512", "--threads", "1", "--device", "cpu", *extra]


def test_train_refuses_a_directory_holding_user_files(data, tmp_path, one_line_error):
    keep = tmp_path / "d" / "sub" / "keep"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    one_line_error(_train(data, tmp_path / "d"), str(tmp_path / "d"), "--overwrite")
    assert keep.read_text() == "mine"
    assert not os.path.exists(str(tmp_path / "d") + ".checkpoints")  # refused before any training


def test_train_replaces_its_own_model_and_refuses_a_file_or_an_input(data, tmp_path, one_line_error):
    assert main(_train(data, tmp_path / "m")) == 0
    assert main(_train(data, tmp_path / "m")) == 0  # its own earlier output
    (tmp_path / "file").write_text("x")
    one_line_error(_train(data, tmp_path / "file"), str(tmp_path / "file"), "is a file")
    one_line_error(_train(data, data / "train"), "overlaps the input")
    one_line_error(_train(data, data / "train" / "model"), "overlaps the input")
    one_line_error(_train(data, data), "overlaps the input")  # the output would contain the inputs
    assert (tmp_path / "file").read_text() == "x"


def test_an_unwritable_output_is_refused_before_work(data, one_line_error):
    # /proc refuses new files even for root: a real place where nothing can be written
    one_line_error(_train(data, "/proc/apem-model"), "/proc/apem-model: cannot write here")


def test_split_refuses_its_own_input(data, one_line_error):
    before = _snapshot(data / "train")
    one_line_error(["split", "--data", str(data / "train"), "--out", str(data / "train")], "overlaps the input")
    assert _snapshot(data / "train") == before


def test_ingest_refuses_to_write_over_the_raw_partitions(tmp_path, one_line_error):
    raw = tmp_path / "raw"
    write_synthetic_events(SynthConfig(rows=300, days=4, seed=1, start=dt.date(2024, 1, 1)), str(raw))
    before = _snapshot(raw)
    for out in (raw, raw / "dataset"):
        one_line_error(["ingest", "--raw", str(raw), "--start", "2024-01-01", "--end", "2024-01-02", "--out", str(out)],
                 "overlaps the input", str(raw))
    assert _snapshot(raw) == before
    assert main(["ingest", "--raw", str(raw), "--start", "2024-01-01", "--end", "2024-01-02",
                 "--out", str(tmp_path / "ds")]) == 0
    assert main(["ingest", "--raw", str(raw), "--start", "2024-01-01", "--end", "2024-01-02",
                 "--out", str(tmp_path / "ds")]) == 0  # a dataset (spec.yaml + _SUCCESS) it wrote itself
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_line_error(["ingest", "--raw", str(raw), "--start", "2024-01-01", "--end", "2024-01-02",
              "--out", str(tmp_path / "mine")], str(tmp_path / "mine"), "--overwrite")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_synth_replaces_its_own_dataset_only(tmp_path, one_line_error):
    out = str(tmp_path / "ds")
    assert main(["synth", "--rows", "200", "--days", "2", "--out", out]) == 0
    assert main(["synth", "--rows", "200", "--days", "2", "--out", out]) == 0
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.csv").write_text("1")
    one_line_error(["synth", "--rows", "200", "--days", "2", "--out", str(tmp_path / "user")], "--overwrite")
    assert main(["synth", "--rows", "200", "--days", "2", "--out", str(tmp_path / "user"), "--overwrite"]) == 0
    assert not (tmp_path / "user" / "a.csv").exists()


def test_outputs_honour_the_umask_and_stale_staging_is_removed(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(str(tmp_path / "f.json")) as tmp:
            open(tmp, "w").write("{}")
        with staged_dir(str(tmp_path / "d")) as tmp:
            open(os.path.join(tmp, "x"), "w").write("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
    dead = tmp_path / ".d.999999999-abc.tmp"  # a pid no process has: a killed writer's leftover
    dead.mkdir()
    live = tmp_path / f".d.{os.getppid()}-abc.tmp"  # a live writer's staging stays
    live.mkdir()
    assert remove_stale_staging(str(tmp_path / "d")) == [str(dead)]
    assert live.exists() and (tmp_path / "d" / "x").exists()


def test_stale_staging_is_removed_anywhere_under_a_tree_and_live_staging_and_outputs_stay(tmp_path):
    """kfp.local's per-run folders: a killed run's staging sits where no later run writes again."""
    killed = tmp_path / "run-a" / "split"
    dead_dir = killed / ".splits.999999999-abc.tmp"  # a pid no process has: a killed writer's
    (dead_dir / "train").mkdir(parents=True)
    dead_file = tmp_path / "run-b" / "train" / ".model.999999999-x.tmp.old"
    dead_file.parent.mkdir(parents=True)
    dead_file.write_text("partial")
    live = tmp_path / "run-c" / "split" / f".splits.{os.getppid()}-abc.tmp"  # a live writer's stays
    live.mkdir(parents=True)
    finished = killed / "splits"
    finished.mkdir()
    assert remove_stale_staging_under(str(tmp_path)) == sorted([str(dead_dir), str(dead_file)])
    assert live.exists() and finished.exists() and not dead_dir.exists() and not dead_file.exists()
    assert remove_stale_staging_under(str(tmp_path)) == []


def test_a_scratch_folder_is_removed_on_exit_and_a_killed_writers_by_the_next_use(tmp_path, monkeypatch):
    """validate's local copy of the drift baseline (components/validate.py): a private folder in the temp dir, gone
    after the block, also when it raises; one that a SIGKILLed validate left is removed by the next one, a live
    writer's and other names' are not."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with scratch_dir("apem-baseline") as scratch:
        assert os.path.dirname(scratch) == str(tmp_path) and os.path.isdir(scratch)
        assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700  # private in a shared temp dir
        open(os.path.join(scratch, "stats.pb"), "w").write("x")
    assert not os.path.exists(scratch)
    with pytest.raises(RuntimeError), scratch_dir("apem-baseline") as scratch:
        raise RuntimeError("validation broke")
    assert not os.path.exists(scratch)
    dead = tmp_path / ".apem-baseline.999999999-abc.tmp"  # a pid no process has: a killed validate's
    (dead / "baseline").mkdir(parents=True)
    live = tmp_path / f".apem-baseline.{os.getppid()}-abc.tmp"  # a validate running beside this one
    live.mkdir()
    other = tmp_path / ".other.999999999-abc.tmp"
    other.mkdir()
    with scratch_dir("apem-baseline"):
        assert not dead.exists() and live.exists() and other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
