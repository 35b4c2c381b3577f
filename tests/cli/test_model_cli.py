import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from apem.cli.main import main
from apem.data.spec import DatasetSpec, write_dataset
from apem.data.features import default_spec
from apem.research.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    table, _ = generate(SynthConfig(rows=5_000, days=5, seed=6))
    spec = default_spec()
    write_dataset(table.slice(0, 3_500), spec, str(root / "train"))
    write_dataset(table.slice(3_500, 750), spec, str(root / "val"))
    write_dataset(table.slice(4_250), spec, str(root / "test"))
    code = main(["train", "--train", str(root / "train"), "--val", str(root / "val"), "--model", "apem_wo_asrg",
                 "--out", str(root / "model"), "--epochs", "2", "--batch-size", "512", "--device", "cpu",
                 "--threads", "1"])
    assert code == 0
    return root


def test_train_evaluate_predict(trained, capsys):
    root = trained
    assert main(["evaluate", "--model", str(root / "model"), "--data", str(root / "test"),
                 "--out", str(root / "out" / "metrics.json")]) == 0
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"click", "authorize", "convert"}
    assert metrics["model"] == "apem_wo_asrg" and metrics["rows"] == 750
    assert {"auc", "auc_subspace", "logloss", "calibration_error", "funnel_consistency"} <= set(metrics["tasks"]["click"])
    assert main(["predict", "--model", str(root / "model"), "--data", str(root / "test"),
                 "--out", str(root / "out" / "preds.parquet")]) == 0
    preds = pq.read_table(root / "out" / "preds.parquet")
    assert preds.column_names == ["impression_id", "p_click", "p_authorize", "p_convert", "funnel_violation"]
    assert not any(preds.column("funnel_violation").to_pylist())
    assert preds.num_rows == 750
    assert preds.column("impression_id").to_pylist() == pq.read_table(root / "test" / "part-00000.parquet").column("impression_id").to_pylist()


def _killed_after_first_checkpoint(argv, checkpoint):
    """Run `apem train` in a real process and SIGKILL it once it has written a checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "apem.cli.main", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint.exists()


def test_resume_continues_only_its_own_run_and_a_finished_run_removes_its_checkpoint(
        trained, capsys, tmp_path, one_line_error):
    root = trained
    out, checkpoint = tmp_path / "model", tmp_path / "model.checkpoints" / "checkpoint.pt"
    argv = ["train", "--train", str(root / "train"), "--val", str(root / "val"), "--model", "apem_wo_asrg",
            "--out", str(out), "--batch-size", "512", "--threads", "1", "--device", "cpu", "--patience", "50"]
    _killed_after_first_checkpoint([*argv, "--epochs", "40"], checkpoint)
    before = checkpoint.read_bytes()
    # another model, seed, optimiser setting or training data: refused, naming the first differing field
    for change, field in ((["--model", "apem_wo_ld"], "model differs"), (["--seed", "99"], "seed differs"),
                          (["--lr", "0.5"], "optimizer differs"), (["--train", str(root / "test")], "training_data")):
        one_line_error([*argv, *change, "--epochs", "3", "--resume"], str(checkpoint), field, "--resume")
    assert checkpoint.read_bytes() == before
    capsys.readouterr()
    assert main([*argv, "--epochs", "3", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 3  # the epochs of the killed run count, the rest are new
    assert not checkpoint.parent.exists()


def test_bad_input_gives_one_line_errors(trained, tmp_path, one_line_error):
    root = trained
    model, test = str(root / "model"), str(root / "test")
    one_line_error(["evaluate", "--model", str(tmp_path / "missing"), "--data", test, "--out", str(tmp_path / "m.json")], "model directory not found")
    future = tmp_path / "future"
    os.makedirs(future)
    for name in os.listdir(model):
        (future / name).write_bytes((root / "model" / name).read_bytes())
    config = json.loads((future / "config.json").read_text())
    (future / "config.json").write_text(json.dumps({**config, "format_version": 0}))
    one_line_error(["predict", "--model", str(future), "--data", test, "--out", str(tmp_path / "p.parquet")], "format version 0")
    # a dataset whose spec differs from the model's
    other_spec = DatasetSpec(**{**default_spec().to_dict(), "numerical": ["credit_score", "balance"]})
    table = generate(SynthConfig(rows=200, days=1, seed=1))[0]
    write_dataset(table, other_spec, str(tmp_path / "other"))
    one_line_error(["evaluate", "--model", model, "--data", str(tmp_path / "other"), "--out", str(tmp_path / "m.json")], "spec does not match", "numerical")
    # an empty dataset
    write_dataset(table.slice(0, 0), default_spec(), str(tmp_path / "empty"))
    one_line_error(["predict", "--model", model, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "p.parquet")], "no rows")
    one_line_error(["train", "--train", str(tmp_path / "empty"), "--val", test, "--out", str(tmp_path / "m2")], "no rows")
    one_line_error(["train", "--train", str(root / "train"), "--val", test, "--model", "nope", "--out", str(tmp_path / "m3")], "unknown model")
    one_line_error(["train", "--train", str(root / "train"), "--val", str(tmp_path / "other"), "--out", str(tmp_path / "m4")], "spec does not match")
    one_line_error(["train", "--train", str(root / "train"), "--val", test, "--data-loading", "streaming",
                    "--val", str(tmp_path / "other"), "--out", str(tmp_path / "m4")], "spec does not match")
    one_line_error(["train", "--train", str(root / "train"), "--val", test, "--loader-workers", "-1",
                    "--out", str(tmp_path / "m6")], "--loader-workers >= 0")
    if not torch.cuda.is_available():
        one_line_error(["train", "--train", str(root / "val"), "--val", test, "--device", "cuda", "--out", str(tmp_path / "m5")], "CUDA is not available")


def test_evaluate_and_predict_replace_only_their_own_output_files(trained, tmp_path, one_line_error):
    root = trained
    model, test = str(root / "model"), str(root / "test")
    for command, name in (("evaluate", "m.json"), ("predict", "p.parquet")):
        out = tmp_path / name
        assert main([command, "--model", model, "--data", test, "--out", str(out)]) == 0
        assert main([command, "--model", model, "--data", test, "--out", str(out)]) == 0  # its own file
        foreign = tmp_path / f"notes-{name}"
        foreign.write_text("user text")
        one_line_error([command, "--model", model, "--data", test, "--out", str(foreign)],
                      str(foreign), "--overwrite")
        assert foreign.read_text() == "user text"
        one_line_error([command, "--model", model, "--data", test, "--out", str(tmp_path)],
                      "is a directory")
        one_line_error([command, "--model", model, "--data", test, "--out", str(root / "model" / name)],
                      "overlaps the input")
    assert pq.read_schema(tmp_path / "p.parquet").metadata[b"apem.output"] == b"predictions"
