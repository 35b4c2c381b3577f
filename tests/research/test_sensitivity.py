"""``apem sensitivity``: every (K, L) cell trained on train and scored on validation, on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apem.cli.main import main
from apem.data.features import default_spec
from apem.data.spec import write_dataset
from apem.research.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """The default 3 x 3 grid, one seed, one epoch on 400 training rows."""
    root = tmp_path_factory.mktemp("sensitivity")
    table, _ = generate(SynthConfig(rows=1_200, days=5, seed=4))
    train = write_dataset(table.slice(0, 800), default_spec(), str(root / "train"))
    val = write_dataset(table.slice(800), default_spec(), str(root / "val"))
    out = root / "study"
    args = ["sensitivity", "--train", train, "--val", val, "--seeds", "1", "--epochs", "1", "--max-rows", "400",
            "--batch-size", "128", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    return {"root": root, "train": train, "val": val, "out": out, "args": args,
            "result": json.loads((out / "sensitivity.json").read_text())}


def test_every_cell_is_trained_and_the_configs_really_differ(study) -> None:
    result = study["result"]
    cells = {(c["k"], c["l"]): c for c in result["cells"]}
    assert list(cells) == [(k, l) for k in (16, 32, 64) for l in (1, 2, 4)]
    assert result["completed_runs"] == len(result["runs"]) == 9 and result["data"]["rows"]["train"] == 400
    params = {key: c["parameters"] for key, c in cells.items()}
    assert len(set(params.values())) == 9  # nine different models, not one model nine times
    for k in (16, 32, 64):
        assert params[(k, 1)] < params[(k, 2)] < params[(k, 4)]
    for l in (1, 2, 4):
        assert params[(16, l)] < params[(32, l)] < params[(64, l)]
    for cell in cells.values():
        assert cell["seeds_done"] == [0] and cell["seconds_per_epoch"] > 0
        assert all(0.0 <= cell["val_auc_mean"][task] <= 1.0 for task in result["labels"])
    markdown = (study["out"] / "sensitivity.md").read_text()
    for k, l in cells:
        assert f"| {k} | {l} | " in markdown
    assert "| K \\ L | 1 | 2 | 4 |" in markdown and "convert val AUC" in markdown and "s/epoch" in markdown


def test_rerun_replaces_its_own_output_only_and_averages_over_seeds(study, tmp_path, capsys) -> None:
    small = ["--k", "4", "--l", "1,2", "--seeds", "2"]
    assert main(study["args"] + small) == 0  # an earlier study in --out is replaced
    result = json.loads((study["out"] / "sensitivity.json").read_text())
    assert [(c["k"], c["l"]) for c in result["cells"]] == [(4, 1), (4, 2)]
    for cell in result["cells"]:
        runs = [r for r in result["runs"] if (r["k"], r["l"]) == (cell["k"], cell["l"])]
        assert cell["seeds_done"] == [0, 1] and [r["seed"] for r in runs] == [0, 1]
        for task in result["labels"]:
            aucs = [r["val_auc"][task] for r in runs]
            assert cell["val_auc_mean"][task] == pytest.approx(np.mean(aucs))
            assert cell["val_auc_std"][task] == pytest.approx(np.std(aucs, ddof=1))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    out_at = study["args"].index("--out") + 1
    args = study["args"][:out_at] + [str(foreign)] + study["args"][out_at + 1:] + small
    assert main(args) == 2
    assert "not a sensitivity study" in capsys.readouterr().err and (foreign / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("extra, message", [
    (["--k", "16,x"], "--k expects comma-separated integers"),
    (["--l", "0,2"], "--l needs distinct values >= 1"),
    (["--model", "esmm"], "has no K (inducing_points) and L (layers)"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--seeds", "0"], "--seeds must be at least 1"),
])
def test_bad_arguments_give_one_line_and_exit_2(study, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "never"
    code = main(["sensitivity", "--train", study["train"], "--val", study["val"], "--out", str(out)] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and not out.exists()


def test_tuned_hyperparameters_apply_to_every_cell_but_k_and_l(study, tmp_path) -> None:
    tuned = tmp_path / "tuned.json"
    best = {"lr": 0.002, "embedding_l2": 1e-4, "numerical_encoding": "dense_log", "inducing_points": 64, "layers": 4}
    tuned.write_text(json.dumps({"format": "apem-tune/1", "models": {"apem": {"best": best}}}))
    out = tmp_path / "tuned_study"
    assert main(["sensitivity", "--train", study["train"], "--val", study["val"], "--k", "2", "--l", "1",
                 "--seeds", "1", "--epochs", "1", "--max-rows", "200", "--threads", "1", "--tuned", str(tuned),
                 "--out", str(out)]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["runs"][0]["hyperparameters"] == {**best, "inducing_points": 2, "layers": 1}
    assert "from apem tune: lr 0.002" in (out / "sensitivity.md").read_text()
