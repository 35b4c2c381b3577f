"""``apem experiment`` end to end on a tiny chronological split, plus its t-test and name handling."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.compute as pc
import pytest
from scipy import stats

from apem.cli.main import main
from apem.models.registry import list_models
from apem.eval.comparison import format_cell
from apem.research.experiment import paired_t_test, resolve_model_names
from apem.data.spec import write_dataset
from apem.data.features import default_spec
from apem.data.oracle import GENERATOR_FILE, ORACLE_DIR, ORACLE_FILE
from apem.research.synth import SynthConfig, generate, generator_record


def test_paired_t_test_matches_a_hand_computation_and_scipy() -> None:
    a = [0.70, 0.72, 0.71, 0.73, 0.74]
    b = [0.69, 0.70, 0.70, 0.71, 0.72]
    d = np.subtract(a, b)  # 0.01, 0.02, 0.01, 0.02, 0.02
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert t == pytest.approx(0.016 / (np.sqrt(0.00003) / np.sqrt(5)))
    expected = 2 * stats.t.sf(abs(t), df=len(d) - 1)
    assert paired_t_test(a, b) == pytest.approx(expected, rel=1e-9)
    assert paired_t_test(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert paired_t_test(a, a) == 1.0
    assert np.isnan(paired_t_test([0.7], [0.6]))
    with pytest.raises(ValueError):
        paired_t_test([0.7, 0.8], [0.6])


def test_model_names_resolve_all_lists_and_reject_unknown() -> None:
    assert resolve_model_names("all") == list_models()
    assert len(list_models()) == 12
    assert resolve_model_names("esmm, apem,esmm") == ["esmm", "apem"]
    with pytest.raises(ValueError, match="unknown model 'xgboost'"):
        resolve_model_names("apem,xgboost")


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory) -> dict[str, str]:
    """A small synthetic dataset split by day: 6 days train, 2 val, 2 test (the oracle goes with test)."""
    root = tmp_path_factory.mktemp("experiment_data")
    table, oracle = generate(SynthConfig(rows=4000, days=10, seed=3))
    spec = default_spec()
    days = pc.cast(table.column(spec.time_column), "int64").to_numpy() // (86_400 * 10**6)
    day_index = days - days.min()
    dirs = {}
    for name, (lo, hi) in {"train": (0, 6), "val": (6, 8), "test": (8, 10)}.items():
        mask = (day_index >= lo) & (day_index < hi)
        dirs[name] = write_dataset(table.filter(mask), spec, str(root / name))
    os.makedirs(os.path.join(dirs["test"], ORACLE_DIR))
    import pyarrow.parquet as pq

    pq.write_table(oracle, os.path.join(dirs["test"], ORACLE_DIR, ORACLE_FILE))
    with open(os.path.join(dirs["test"], ORACLE_DIR, GENERATOR_FILE), "w") as fh:
        fh.write(generator_record(SynthConfig(rows=4000, days=10, seed=3)))
    return dirs


def test_experiment_grid_writes_report_and_survives_a_failing_model(split_dirs, tmp_path, monkeypatch) -> None:
    from apem.models import registry

    # a model whose config is invalid fails at build time; the grid must report it and go on
    broken = dataclasses.replace(registry.registered("mmoe"), config_defaults={"dropout": 1.5})
    monkeypatch.setitem(registry._REGISTRY, "mmoe", broken)
    out = tmp_path / "report"
    code = main(["experiment", "--train", split_dirs["train"], "--val", split_dirs["val"], "--test", split_dirs["test"],
                 "--models", "apem,single_task,esmm,mmoe", "--seeds", "2", "--epochs", "1", "--batch-size", "256",
                 "--threads", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    labels = report["labels"]
    assert labels == ["click", "authorize", "convert"]
    assert list(report["models"]) == ["apem", "single_task", "esmm", "mmoe"]
    for name in ("apem", "single_task", "esmm"):
        entry = report["models"][name]
        assert entry["seeds_ok"] == [0, 1] and entry["errors"] == []
        for label in labels:
            assert len(entry["aucs"][label]) == 2
            assert entry["auc_mean"][label] == pytest.approx(np.mean(entry["aucs"][label]))
            assert entry["auc_std"][label] == pytest.approx(np.std(entry["aucs"][label], ddof=1))
            assert all(0.0 <= a <= 1.0 for a in entry["aucs"][label])  # tiny data: quality is not asserted here
        assert entry["parameters"] > 0 and entry["model_bytes"] >= 4 * entry["parameters"]
        assert entry["seconds_per_epoch"] > 0 and entry["inference_seconds"] > 0
    apem, esmm = report["models"]["apem"], report["models"]["esmm"]
    for label in labels:
        assert apem["p_value_vs_apem"][label] is None
        assert esmm["p_value_vs_apem"][label] == pytest.approx(paired_t_test(apem["aucs"][label], esmm["aucs"][label]))
        single = report["models"]["single_task"]["auc_mean"][label]
        assert esmm["gain_over_single_task"][label] == pytest.approx((esmm["auc_mean"][label] - single) / single)
    failed = report["models"]["mmoe"]
    assert failed["seeds_ok"] == [] and len(failed["errors"]) == 2 and "dropout" in failed["errors"][0]["error"]
    oracle = report["oracle_auc"]
    assert oracle["matched_rows"] == oracle["test_rows"] == report["config"]["rows"]["test"]
    assert all(0.5 < oracle["tasks"][label] <= 1.0 for label in labels)
    attainable = report["attainable_auc"]  # estimated from the same training rows the models saw
    assert attainable["train_rows"] == report["config"]["rows"]["train"] and attainable["negative_rate"] == 1.0
    assert all(0.5 < attainable["tasks"][label] < oracle["tasks"][label] for label in labels)
    for label in labels:
        assert esmm["reachable_gap_closed"][label] == pytest.approx(
            (esmm["auc_mean"][label] - 0.5) / (attainable["tasks"][label] - 0.5))
    selection = report["selection_rate"]
    assert 0.0 <= selection["mean"] <= 1.0 and sum(selection["histogram"]["counts"]) == oracle["test_rows"]
    assert selection["median"] == selection["quantiles"]["0.5"] and selection["samples"] == oracle["test_rows"]
    pca = selection["pca"]  # Fig 7b: bottom / middle / top 1% of rates, 2-D coordinates each
    assert list(pca["groups"]) == ["bottom", "middle", "top"] and pca["group_size"] == oracle["test_rows"] // 100
    assert all(np.asarray(g["points"]).shape == (pca["group_size"], 2) for g in pca["groups"].values())
    rates = [pca["groups"][g]["mean_rate"] for g in ("bottom", "middle", "top")]
    assert rates == sorted(rates) and len(pca["explained_variance_ratio"]) == 2
    assert all(set(run["val_auc"]) == set(labels) and len(run["val_auc_by_epoch"]) == run["epochs_run"]
               for run in report["runs"] if not run.get("error"))
    assert apem["val_auc_mean"]["convert"] == pytest.approx(np.mean([r["val_auc"]["convert"] for r in report["runs"]
                                                                      if r["model"] == "apem"]))
    for png in ("auc_comparison.png", "efficiency.png", "selection_rate.png", "selection_pca.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| esmm |" in markdown and "oracle" in markdown and "mmoe seed 0:" in markdown
    assert "Fig 7a" in markdown and "median" in markdown and "Fig 7b" in markdown
    assert "| attainable (generator known, user vectors estimated) |" in markdown
    assert "## Against the references" in markdown and "click of attainable" in markdown


def test_tune_gives_every_model_the_same_budget_and_experiment_reads_it(split_dirs, tmp_path, capsys) -> None:
    from apem.research.tuning import search_space

    assert {"inducing_points", "layers"} <= set(search_space("apem", ("log_round",)))
    assert "n_experts" in search_space("mmoe", ("log_round",)) and "n_shared_experts" in search_space("ple", ("x",))
    assert set(search_space("esmm", ("log_round",))) == {"lr", "embedding_l2", "numerical_encoding"}
    out, uri = tmp_path / "tuned.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["tune", "--train", split_dirs["train"], "--val", split_dirs["val"], "--models", "apem,mmoe",
                 "--trials", "2", "--epochs", "1", "--batch-size", "256", "--threads", "1",
                 "--encodings", "log_round,dense_log", "--mlflow-uri", uri, "--out", str(out)]) == 0
    tuned = json.loads(out.read_text())
    assert tuned["format"] == "apem-tune/1" and tuned["budget"]["trials_per_model"] == 2
    for name in ("apem", "mmoe"):
        entry = tuned["models"][name]
        assert len(entry["trials"]) == 2
        assert entry["best_val_auc_mean"] == max(t["val_auc_mean"] for t in entry["trials"])
        assert entry["best"]["numerical_encoding"] in ("log_round", "dense_log")
    assert set(tuned["models"]["apem"]["best"]) == {"lr", "embedding_l2", "numerical_encoding", "inducing_points", "layers"}
    import mlflow

    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("apem-tune").experiment_id])
    assert len(runs) == 2 + 4  # one per model, one nested run per trial
    report_dir = tmp_path / "tuned_report"
    assert main(["experiment", "--train", split_dirs["train"], "--val", split_dirs["val"], "--test", split_dirs["test"],
                 "--models", "apem,mmoe", "--seeds", "1", "--epochs", "1", "--batch-size", "256", "--threads", "1",
                 "--tuned", str(out), "--out", str(report_dir), "--no-progress"]) == 0
    runs = {r["model"]: r for r in json.loads((report_dir / "report.json").read_text())["runs"]}
    for name in ("apem", "mmoe"):
        best = tuned["models"][name]["best"]
        assert runs[name]["numerical_encoding"] == best["numerical_encoding"]
        assert runs[name]["hyperparameters"]["lr"] == best["lr"]
    assert runs["apem"]["hyperparameters"]["inducing_points"] == tuned["models"]["apem"]["best"]["inducing_points"]
    capsys.readouterr()
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main(["tune", "--train", split_dirs["train"], "--val", split_dirs["val"], "--models", "esmm",
                 "--trials", "1", "--out", str(foreign)]) == 2
    assert "not an `apem tune` result" in capsys.readouterr().err and foreign.read_text() == '{"mine": 1}'


def test_experiment_cli_rejects_bad_arguments(split_dirs, tmp_path, capsys) -> None:
    common = ["experiment", "--train", split_dirs["train"], "--val", split_dirs["val"], "--test", split_dirs["test"],
              "--out", str(tmp_path / "r")]
    assert main(common + ["--models", "apem,nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(common + ["--models", "esmm", "--seeds", "0"]) == 2
    assert main(["experiment", "--train", str(tmp_path / "missing"), "--val", split_dirs["val"], "--test",
                 split_dirs["test"], "--out", str(tmp_path / "r"), "--models", "esmm"]) == 2
    assert "missing" in capsys.readouterr().err


def test_merged_parts_give_the_summary_only_the_whole_grid_has(split_dirs, tmp_path, capsys) -> None:
    """A grid run as two processes (a baseline, APEM) and merged: every part's runs, and the t-tests
    against APEM that neither part alone can compute."""
    tuned = tmp_path / "tuned.json"  # one file for the whole grid; each part reads its own models' entries
    tuned.write_text(json.dumps({"format": "apem-tune/1", "models": {
        "shared_bottom": {"best": {"lr": 0.003}}, "apem": {"best": {"lr": 0.002, "inducing_points": 8}}}}))
    common = ["--train", split_dirs["train"], "--val", split_dirs["val"], "--test", split_dirs["test"],
              "--seeds", "2", "--epochs", "1", "--batch-size", "256", "--threads", "1", "--no-progress",
              "--tuned", str(tuned)]
    for name, models in (("part_a", "shared_bottom"), ("part_b", "apem")):
        assert main(["experiment", *common, "--models", models, "--out", str(tmp_path / name)]) == 0
    parts = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("part_a", "part_b")}
    assert parts["part_a"]["models"]["shared_bottom"]["p_value_vs_apem"]["click"] is None  # no APEM in part a
    merged = tmp_path / "merged"
    assert main(["experiment-merge", str(tmp_path / "part_a"), str(tmp_path / "part_b"), "--out", str(merged)]) == 0
    report = json.loads((merged / "report.json").read_text())
    assert list(report["models"]) == ["shared_bottom", "apem"] and report["completed_runs"] == 4
    apem, baseline = report["models"]["apem"], report["models"]["shared_bottom"]
    for label in report["labels"]:
        assert baseline["aucs"][label] == parts["part_a"]["models"]["shared_bottom"]["aucs"][label]
        assert apem["aucs"][label] == parts["part_b"]["models"]["apem"]["aucs"][label]
        assert baseline["p_value_vs_apem"][label] == pytest.approx(
            paired_t_test(apem["aucs"][label], baseline["aucs"][label]))
    assert report["selection_rate"] == parts["part_b"]["selection_rate"]
    assert [part["report"] for part in report["config"]["merged_from"]] == [str(tmp_path / "part_a"),
                                                                           str(tmp_path / "part_b")]
    assert report["config"]["tuned"] == {"shared_bottom": {"lr": 0.003}, "apem": {"lr": 0.002, "inducing_points": 8}}
    markdown = (merged / "report.md").read_text()
    assert (merged / "auc_comparison.png").exists() and "| shared_bottom |" in markdown
    assert "- shared_bottom: lr 0.003" in markdown and "- apem: lr 0.002, inducing_points 8" in markdown

    # refused: the same (model, seed) twice, and parts that are not the same experiment; one line, exit 2
    capsys.readouterr()
    assert main(["experiment-merge", str(tmp_path / "part_a"), str(merged), "--out", str(tmp_path / "dup")]) == 2
    assert "shared_bottom seed 0 is also in" in capsys.readouterr().err
    other = parts["part_b"]
    other["config"]["epochs"] = 3
    os.makedirs(tmp_path / "part_c")
    (tmp_path / "part_c" / "report.json").write_text(json.dumps(other))
    assert main(["experiment-merge", str(tmp_path / "part_a"), str(tmp_path / "part_c"), "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "config 'epochs' is 3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() and not (tmp_path / "dup").exists()


def test_merge_compares_references_but_not_how_long_they_took() -> None:
    from apem.research.merge_reports import _check_same_experiment

    config = {"train": "t", "val": "v", "test": "s", "rows": {"train": 1}, "epochs": 1, "batch_size": 8,
              "patience": 1, "max_rows": None}

    def report(click: float, seconds: float) -> dict:
        return {"config": dict(config), "labels": ["click"], "runs": [],
                "attainable_auc": {"tasks": {"click": click}, "seconds": seconds}}

    _check_same_experiment({"a": report(0.71, 32.1), "b": report(0.71, 13.0)})  # timing differs: the same
    with pytest.raises(ValueError, match="'attainable_auc' differs"):
        _check_same_experiment({"a": report(0.71, 32.1), "b": report(0.72, 32.1)})


@pytest.mark.parametrize("content", ['{"config": {}, "runs": []}', '{"config": {"models": ["apem"]}, "runs": [{}]}',
                                     '[1, 2]', 'not json'])
def test_merge_refuses_a_report_json_it_did_not_write_in_one_line(tmp_path, capsys, content) -> None:
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "report.json").write_text(content)
    assert main(["experiment-merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report.json" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_format_cell_shows_missing_and_non_finite_values_as_a_dash() -> None:
    """The report tables of ``apem experiment`` and ``apem sensitivity`` share this formatter."""
    assert [format_cell(v) for v in (None, float("nan"), float("inf"), np.float64("nan"))] == ["–"] * 4
    assert format_cell(0.123456) == "0.1235" and format_cell(2.5, ".2f") == "2.50"
    assert format_cell(None, missing="n/a") == "n/a"
