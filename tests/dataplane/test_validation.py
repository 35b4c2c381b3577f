import json
import os

import numpy as np
import pyarrow as pa
import pytest

from apem.data import storage
from apem.cli.main import main as apem_main
from apem.data.features import default_spec
from apem.research.synth import SynthConfig, generate
from apem.data.spec import write_dataset
from apem.dataplane.validation import DEFAULT_SCHEMA, ValidationFailed, load_schema, validate_dataset

ROWS = 3000


def _dataset(path, seed=0, edit=None):
    table, _ = generate(SynthConfig(rows=ROWS, days=6, seed=seed))
    if edit:
        table = edit(table)
    write_dataset(table, default_spec(), str(path))
    return str(path)


def _replace(table, name, values):
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    data = _dataset(root / "clean")
    return data, validate_dataset(data, out_dir=str(root / "report"))


def test_committed_schema_is_curated():
    schema = load_schema(DEFAULT_SCHEMA)
    features = {f.name: f for f in schema.feature}
    assert set(default_spec().columns) - {"impression_id"} == set(features)
    assert features["credit_score"].float_domain.max == 900
    assert features["channel"].drift_comparator.infinity_norm.threshold > 0
    assert features["balance"].drift_comparator.jensen_shannon_divergence.threshold > 0
    assert not features["user_id"].HasField("domain")  # open vocabulary


def test_clean_data_passes_and_writes_reports(clean):
    _, result = clean
    assert result["anomalies"] == [] and result["examples"] == ROWS
    for key in ("stats_path", "report_path", "anomalies_path"):
        assert os.path.getsize(result[key]) > 0
    report = open(result["report_path"]).read()
    assert "no anomalies" in report and "| credit_score |" in report
    assert json.load(open(result["anomalies_path"]))["summary"] == "no anomalies"


def test_bad_values_fail_with_one_line_summary(tmp_path):
    def corrupt(table):
        channel = table.column("channel").to_pylist()
        channel[:5] = ["fax"] * 5
        credit = table.column("credit_score").to_numpy().copy()
        credit[:3] = 1200.0
        return _replace(_replace(table, "channel", channel), "credit_score", credit)

    data = _dataset(tmp_path / "bad", edit=corrupt)
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(data, out_dir=str(tmp_path / "report"))
    message = str(err.value)
    assert "\n" not in message and "2 anomalies" in message
    assert "channel:" in message and "credit_score:" in message
    result = validate_dataset(data, out_dir=str(tmp_path / "report2"), warn_only=True)
    assert {a["feature"] for a in result["anomalies"]} == {"channel", "credit_score"}
    assert "fax" in open(result["report_path"]).read()
    # the CLI exits non-zero with that one line
    code = apem_main(["validate", "--data", data, "--schema", DEFAULT_SCHEMA, "--out", str(tmp_path / "r3")])
    assert code == 1


def test_drift_against_previous_window(clean, tmp_path, gcs_prefix):
    _, baseline = clean
    # an independent window of the same process does not drift; reports can go to gs://
    same = _dataset(tmp_path / "same", seed=1)
    result = validate_dataset(same, out_dir=storage.join(gcs_prefix, "report"),
                              baseline_stats=baseline["stats_path"])
    assert result["anomalies"] == []
    assert result["drift"]["channel"]["type"] == "L_INFTY" and not result["drift"]["channel"]["drifted"]
    assert result["drift"]["balance"]["type"] == "JENSEN_SHANNON_DIVERGENCE"
    assert storage.exists(result["stats_path"]) and result["stats_path"].startswith("gs://")

    def shift(table):
        rng = np.random.default_rng(0)
        channel = np.where(rng.random(table.num_rows) < 0.5, "sms", table.column("channel").to_numpy())
        balance = table.column("balance").to_numpy() * 40 + 5000
        return _replace(_replace(table, "channel", channel), "balance", balance)

    drifted = _dataset(tmp_path / "drifted", seed=1, edit=shift)
    with pytest.raises(ValidationFailed, match="channel") as err:
        validate_dataset(drifted, out_dir=str(tmp_path / "r"), baseline_stats=baseline["stats_path"])
    assert "balance" in str(err.value)
    result = validate_dataset(drifted, out_dir=str(tmp_path / "r2"), baseline_stats=baseline["stats_path"],
                              warn_only=True)
    assert result["drift"]["channel"]["drifted"] and result["drift"]["channel"]["value"] > 0.1
    assert result["drift"]["balance"]["drifted"]


def test_a_change_of_unit_is_caught_at_a_few_thousand_rows(clean, tmp_path):
    _, baseline = clean
    tenfold = _dataset(tmp_path / "tenfold", seed=1,
                       edit=lambda t: _replace(t, "balance", t.column("balance").to_numpy() * 10))
    result = validate_dataset(tenfold, out_dir=str(tmp_path / "r"), baseline_stats=baseline["stats_path"],
                              warn_only=True)
    scale = [a for a in result["anomalies"] if "SCALE_DRIFT" in a["types"]]
    assert [a["feature"] for a in scale] == ["balance"], result["anomalies"]
    same = validate_dataset(_dataset(tmp_path / "same", seed=1), out_dir=str(tmp_path / "r2"),
                            baseline_stats=baseline["stats_path"])
    assert same["anomalies"] == []  # another window of the same process: no false alarm
