"""The data contract: spec parsing and the errors loading a dataset must give."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from apem.data.spec import DatasetError, DatasetSpec, read_dataset, write_dataset

SPEC = DatasetSpec(
    time_column="event_time",
    labels=("click", "authorize", "convert"),
    categorical=("user_id", "product_id"),
    numerical=("balance",),
    id_column="impression_id",
)


def _table(n=6, **overrides):
    cols = {
        "impression_id": pa.array([f"i{i}" for i in range(n)]),
        "event_time": pa.array((np.datetime64("2026-01-01T00:00:00") + np.arange(n).astype("timedelta64[h]")).astype("datetime64[us]")),
        "user_id": pa.array([f"u{i % 3}" for i in range(n)]),
        "product_id": pa.array(np.arange(n) % 2),
        "balance": pa.array(np.linspace(0, 1e6, n)),
        "click": pa.array([1, 1, 1, 0, 0, 1], pa.int8()),
        "authorize": pa.array([1, 1, 0, 0, 0, 0], pa.int8()),
        "convert": pa.array([1, 0, 0, 0, 0, 0], pa.int8()),
    }
    cols.update(overrides)
    return pa.table(cols)


def test_round_trip_keeps_rows_and_spec(tmp_path):
    path = write_dataset(_table(), SPEC, str(tmp_path / "ds"))
    ds = read_dataset(path)
    assert ds.spec == SPEC
    assert len(ds) == 6
    np.testing.assert_array_equal(ds.labels()[:, 0], [1, 1, 1, 0, 0, 1])
    assert ds.funnel.violations == 0


def test_unknown_spec_key_is_an_error(tmp_path):
    path = write_dataset(_table(), SPEC, str(tmp_path / "ds"))
    raw = yaml.safe_load(open(os.path.join(path, "spec.yaml")))
    raw["numerics"] = ["balance"]
    yaml.safe_dump(raw, open(os.path.join(path, "spec.yaml"), "w"))
    with pytest.raises(DatasetError, match=r"spec.yaml: unknown key\(s\) \['numerics'\]"):
        read_dataset(path)


def _write_raw(tmp_path, table):
    path = tmp_path / "raw"
    path.mkdir()
    SPEC.write(str(path))
    pq.write_table(table, str(path / "part-00000.parquet"))
    return str(path)


def test_missing_column_names_file_and_column(tmp_path):
    path = _write_raw(tmp_path, _table().drop(["balance"]))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: missing column 'balance' \(numerical"):
        read_dataset(path)


def test_label_not_binary_names_file_column_and_row(tmp_path):
    path = _write_raw(tmp_path, _table(click=pa.array([1, 1, 1, 0, 2, 1], pa.int8())))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: label column 'click' must be 0/1; 1 row\(s\).*row 4: 2"):
        read_dataset(path)


def test_wrong_dtype_names_file_and_column(tmp_path):
    path = _write_raw(tmp_path, _table(balance=pa.array(["a"] * 6)))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: column 'balance' has dtype string, expected integer or float"):
        read_dataset(path)


def test_float_labels_are_a_dtype_error(tmp_path):
    path = _write_raw(tmp_path, _table(convert=pa.array([1.0, 0, 0, 0, 0, 0])))
    with pytest.raises(DatasetError, match="column 'convert' has dtype double"):
        read_dataset(path)


def test_funnel_violations_rejected_by_default_and_dropped_with_report(tmp_path):
    # row 3 converts without clicking; row 5 authorizes without... (authorize=1 after click=1 is fine)
    table = _table(convert=pa.array([1, 0, 0, 1, 0, 0], pa.int8()), authorize=pa.array([1, 1, 0, 0, 0, 1], pa.int8()))
    path = write_dataset(table, SPEC, str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match=r"1 row\(s\) violate the funnel order"):
        read_dataset(path)
    ds = read_dataset(path, funnel_policy="drop")
    assert len(ds) == 5
    assert ds.funnel.dropped == 1 and ds.funnel.by_step == {"click>authorize": 0, "authorize>convert": 1}


def test_empty_dataset_and_missing_spec_are_clear(tmp_path):
    path = write_dataset(_table().slice(0, 0), SPEC, str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="dataset has no rows"):
        read_dataset(path)
    os.makedirs(tmp_path / "nospec")
    with pytest.raises(DatasetError, match="spec file not found"):
        read_dataset(str(tmp_path / "nospec"))


def test_spec_rejects_one_step_funnel_and_duplicate_roles():
    with pytest.raises(DatasetError, match="2 or more funnel steps"):
        DatasetSpec.from_dict({"time_column": "t", "labels": ["click"], "categorical": ["a"], "numerical": []})
    with pytest.raises(DatasetError, match="listed as both categorical and numerical"):
        DatasetSpec.from_dict({"time_column": "t", "labels": ["a1", "b1"], "categorical": ["x"], "numerical": ["x"]})


def test_write_is_atomic_and_replaces(tmp_path):
    target = str(tmp_path / "ds")
    write_dataset(_table(), SPEC, target)
    write_dataset(_table().slice(0, 3), SPEC, target)
    assert len(read_dataset(target)) == 3
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
