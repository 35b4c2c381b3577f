"""Issue 11: every failure a user can cause is one line naming the file/column/URI, exit 2, no
traceback; predict scores unlabelled data and flags funnel breaks; `drop` reports its counts."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from apem.cli.main import main
from apem.data import storage
from apem.data.features import default_spec
from apem.data.spec import DatasetSpec, write_dataset
from apem.dataplane.split import split_dataset
from cli_data import write_train_val

FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    table = write_train_val(root, seed=2)
    assert main(["train", "--train", str(root / "train"), "--val", str(root / "val"), "--model", "shared_bottom",
                 "--out", str(root / "model"), "--epochs", "1", "--threads", "1", "--device", "cpu"]) == 0
    return root, table


def _corrupt_pages(path):
    """Overwrite the data pages of a Parquet file, keeping its footer (and so its schema) intact."""
    data = bytearray(open(path, "rb").read())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = b"\xff" * (len(data) - footer - 4)
    open(path, "wb").write(bytes(data))


def test_corrupt_parquet_pages_are_one_line_errors_everywhere(world, tmp_path, one_line_error):
    root, table = world
    bad = tmp_path / "bad"
    write_dataset(table.slice(0, 600), default_spec(), str(bad))
    part = str(bad / "part-00000.parquet")
    _corrupt_pages(part)
    pq.read_schema(part)  # the footer still reads: only the pages are broken
    model = str(root / "model")
    one_line_error(["evaluate", "--model", model, "--data", str(bad), "--out", str(tmp_path / "m.json")], part)
    one_line_error(["predict", "--model", model, "--data", str(bad), "--out", str(tmp_path / "p.parquet")], part)
    one_line_error(["train", "--train", str(bad), "--val", str(root / "val"), "--out", str(tmp_path / "m")], part)
    one_line_error(["split", "--data", str(bad), "--out", str(tmp_path / "s")], part, "corrupt Parquet data")
    # the whole command in its own process: exit 2, not 134 (an abort from a Beam worker)
    done = subprocess.run([sys.executable, "-m", "apem.cli.main", "validate", "--data", str(bad),
                           "--out", str(tmp_path / "v")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr and part in done.stderr, done.stderr


def test_split_checks_the_contract_before_beam(world, tmp_path, one_line_error):
    _, table = world
    spec = default_spec()
    cases = {
        "tag": ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        "list_time": (None, "'time_column' must be one column name"),
    }
    for name, (text, fragment) in cases.items():
        write_dataset(table.slice(0, 300), spec, str(tmp_path / name))
        spec_text = text or (tmp_path / name / "spec.yaml").read_text().replace(
            "time_column: event_time", "time_column: [event_time]")
        (tmp_path / name / "spec.yaml").write_text(spec_text)
        one_line_error(["split", "--data", str(tmp_path / name), "--out", str(tmp_path / f"o_{name}")],
                  str(tmp_path / name / "spec.yaml"), fragment)
    no_balance = table.slice(0, 300).drop(["balance"])
    string_score = table.slice(0, 300).set_column(table.schema.get_field_index("credit_score"), "credit_score",
                                                  pc.cast(table.column("credit_score").slice(0, 300), pa.string()))
    null_click = table.slice(0, 300).set_column(table.schema.get_field_index("click"), "click",
                                                pa.array([None] * 300, pa.int8()))
    for name, bad, fragment in (("missing", no_balance, "missing column 'balance'"),
                                ("string", string_score, "column 'credit_score' has dtype string"),
                                ("nulls", null_click, "label column 'click' has 300 null")):
        (tmp_path / name).mkdir()
        pq.write_table(bad, tmp_path / name / "part-0.parquet")
        spec.write(str(tmp_path / name))
        one_line_error(["split", "--data", str(tmp_path / name), "--out", str(tmp_path / f"o_{name}")],
                  str(tmp_path / name / "part-0.parquet"), fragment)
        assert not (tmp_path / f"o_{name}").exists()


def test_negative_downsampling_without_an_id_column_is_deterministic(world, tmp_path):
    _, table = world
    spec = DatasetSpec(**{k: v for k, v in default_spec().to_dict().items() if k != "id_column"})
    write_dataset(table.drop(["impression_id"]), spec, str(tmp_path / "no_id"))
    first = split_dataset(str(tmp_path / "no_id"), str(tmp_path / "a"), negative_rate=0.3, pipeline_args=FAST)
    again = split_dataset(str(tmp_path / "no_id"), str(tmp_path / "b"), negative_rate=0.3,
                          pipeline_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert first["sampling_key"] == "row contents" and first["rows"] == again["rows"]
    train = first["rows"]["train"]
    assert 0 < train["after_sampling"] < train["before_sampling"]

    def rows(path):
        t = pq.read_table([str(p) for p in sorted((path / "train").glob("*.parquet"))])
        return sorted(map(tuple, t.to_pandas().astype(str).itertuples(index=False)))

    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_bad_negative_rate_in_a_model_dir(world, tmp_path, one_line_error):
    root, _ = world
    for value in (0, 5, "abc"):
        model = tmp_path / f"m_{value}"
        model.mkdir()
        for name in os.listdir(root / "model"):
            (model / name).write_bytes((root / "model" / name).read_bytes())
        config = json.loads((model / "config.json").read_text())
        config["meta"]["negative_rate"] = value
        (model / "config.json").write_text(json.dumps(config))
        one_line_error(["evaluate", "--model", str(model), "--data", str(root / "val"), "--out", str(tmp_path / "m.json")],
                  str(model / "config.json"), "meta.negative_rate")


def test_unsafe_weights_are_refused_without_torch_advice(world, tmp_path, one_line_error):
    root, _ = world
    model = tmp_path / "evil"
    model.mkdir()
    for name in os.listdir(root / "model"):
        (model / name).write_bytes((root / "model" / name).read_bytes())
    import torch

    torch.save({"x": np.dtype}, model / "weights.pt", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    err = one_line_error(["predict", "--model", str(model), "--data", str(root / "val"), "--out", str(tmp_path / "p.parquet")],
                    "weights.pt", "refused")
    assert "weights_only" not in err


def test_gcs_without_credentials_or_bucket_names_the_uri(tmp_path, monkeypatch, gcs_bucket, one_line_error):
    one_line_error(["ingest", "--raw", "gs://no-such-bucket-apem/raw", "--start", "2024-01-01", "--end", "2024-01-02",
               "--out", str(tmp_path / "d")], "gs://no-such-bucket-apem/raw")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for key, value in (("NO_GCE_CHECK", "True"), ("GCE_METADATA_HOST", "127.0.0.1:9"),
                       ("GCE_METADATA_IP", "127.0.0.1:9"), ("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))):
        monkeypatch.setenv(key, value)
    one_line_error(["ingest", "--raw", "gs://some-bucket/raw", "--start", "2024-01-01", "--end", "2024-01-02",
               "--out", str(tmp_path / "d")], "gs://some-bucket/raw", "no Google Cloud credentials")


def test_evaluate_a_gcs_model_directory(world, tmp_path, gcs_prefix):
    root, _ = world
    remote = storage.upload_dir(str(root / "model"), storage.join(gcs_prefix, "model"))
    assert main(["evaluate", "--model", remote, "--data", str(root / "val"), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == 500


def test_predict_scores_unlabelled_data_and_flags_funnel_breaks(world, tmp_path, capsys, caplog):
    root, table = world
    part = table.slice(1_000)
    (tmp_path / "unlabelled").mkdir()  # what a user scores: features only, no label columns
    pq.write_table(part.drop(["click", "authorize", "convert"]), tmp_path / "unlabelled" / "part-0.parquet")
    default_spec().write(str(tmp_path / "unlabelled"))
    assert main(["predict", "--model", str(root / "model"), "--data", str(tmp_path / "unlabelled"),
                 "--out", str(tmp_path / "u.parquet")]) == 0
    assert pq.read_table(tmp_path / "u.parquet").num_rows == 500
    # three rows that convert without authorizing, under funnel_policy: drop
    auth = part.column("authorize").to_numpy().copy()
    broken = np.flatnonzero(auth == 0)[:3]
    conv = part.column("convert").to_numpy().copy()
    conv[broken] = 1
    bad = part.set_column(part.schema.get_field_index("convert"), "convert", pa.array(conv, pa.int8()))
    spec = DatasetSpec(**{**default_spec().to_dict(), "funnel_policy": "drop"})
    write_dataset(bad, spec, str(tmp_path / "broken"))
    capsys.readouterr()
    assert main(["predict", "--model", str(root / "model"), "--data", str(tmp_path / "broken"),
                 "--out", str(tmp_path / "b.parquet")]) == 0
    preds = pq.read_table(tmp_path / "b.parquet")
    assert preds.num_rows == 500 and np.flatnonzero(preds.column("funnel_violation").to_numpy()).tolist() == broken.tolist()
    assert "3 row(s) violate the funnel order" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--model", str(root / "model"), "--data", str(tmp_path / "broken"),
                     "--out", str(tmp_path / "m.json")]) == 0
    assert "dropped 3 of 500 row(s)" in caplog.text and "'authorize>convert': 3" in caplog.text


def test_an_unreachable_gcs_endpoint_fails_within_30_seconds(tmp_path, monkeypatch, one_line_error):
    import socket
    import time

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    one_line_error(["ingest", "--raw", "gs://apem-test/raw", "--start", "2024-01-01", "--end", "2024-01-02",
                    "--out", str(tmp_path / "d")], "gs://apem-test/raw")
    assert time.monotonic() - started < 30
