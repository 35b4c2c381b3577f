"""``apem predict --model models:/<name>@champion`` reads the champion from the MLflow registry and
predicts exactly what its model directory predicts, recalibrated, on unlabelled rows."""

import numpy as np
import pyarrow.parquet as pq

from apem.cli.main import main


def test_registry_champion_predicts_like_its_model_directory(tiny_champion, tmp_path, monkeypatch):
    champion = tiny_champion
    by_dir, by_registry, by_env = (str(tmp_path / f"{n}.parquet") for n in ("dir", "registry", "env"))
    assert main(["predict", "--model", champion["model_dir"], "--data", champion["unlabelled"], "--out", by_dir]) == 0
    assert main(["predict", "--model", champion["model_uri"], "--mlflow-uri", champion["tracking_uri"],
                 "--data", champion["unlabelled"], "--out", by_registry]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["tracking_uri"])
    assert main(["predict", "--model", f"models:/{champion['name']}/1", "--data", champion["unlabelled"],
                 "--out", by_env]) == 0
    expected = pq.read_table(by_dir)
    assert expected.column_names == ["impression_id", "p_click", "p_authorize", "p_convert"]
    assert expected.num_rows == 300
    for path in (by_registry, by_env):
        assert pq.read_table(path).equals(expected)


def test_recalibration_follows_the_registered_negative_rate(tiny_champion, tmp_path):
    champion = tiny_champion
    raw, recalibrated = str(tmp_path / "raw.parquet"), str(tmp_path / "cal.parquet")
    common = ["--model", champion["model_uri"], "--mlflow-uri", champion["tracking_uri"], "--data", champion["unlabelled"]]
    assert main(["predict", *common, "--out", raw, "--no-recalibrate"]) == 0
    assert main(["predict", *common, "--out", recalibrated]) == 0
    p, q = (pq.read_table(path).column("p_click").to_numpy() for path in (raw, recalibrated))
    np.testing.assert_allclose(q, p / (p + (1 - p) / 0.5), rtol=1e-6)  # trained with negative rate 0.5


def test_registry_mistakes_are_one_line_errors(tiny_champion, tmp_path, one_line_error, monkeypatch):
    champion = tiny_champion
    out = str(tmp_path / "p.parquet")
    data = ["--data", champion["unlabelled"], "--out", out]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    one_line_error(["predict", "--model", champion["model_uri"], *data], "MLFLOW_TRACKING_URI", "--mlflow-uri")
    uri = ["--mlflow-uri", champion["tracking_uri"]]
    one_line_error(["predict", "--model", f"models:/{champion['name']}@nobody", *uri, *data], "@nobody")
    one_line_error(["predict", "--model", "models:/missing-model@champion", *uri, *data], "missing-model")
    one_line_error(["predict", "--model", "models:/", *uri, *data], "models:/<name>@<alias>")


def test_evaluate_reads_the_registry_champion_too(tiny_champion, tmp_path):
    import json

    champion = tiny_champion
    labelled = str(champion["root"] / "train")
    by_dir, by_registry = str(tmp_path / "dir.json"), str(tmp_path / "registry.json")
    assert main(["evaluate", "--model", champion["model_dir"], "--data", labelled, "--out", by_dir]) == 0
    assert main(["evaluate", "--model", champion["model_uri"], "--mlflow-uri", champion["tracking_uri"],
                 "--data", labelled, "--out", by_registry]) == 0
    expected, got = (json.load(open(path)) for path in (by_dir, by_registry))
    assert got["model_dir"] == champion["model_uri"] and got["tasks"] == expected["tasks"]
