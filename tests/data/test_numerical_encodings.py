"""The numerical encodings shared by every model: log_round (the paper's), dense_log, quantile:N."""

import json

import numpy as np
import pyarrow as pa
import pytest

from apem.data.encoding import (DENSE_SCALE, NAN_CODE, FeatureEncoder, log_round, parse_numerical_encoding,
                                quantile_codes, quantile_edges, signed_log)
from apem.data.spec import Dataset, DatasetSpec

SPEC = DatasetSpec(time_column="t", labels=("a", "b"), categorical=("city",), numerical=("amount", "age"))


def _dataset(amount, age):
    n = len(amount)
    table = pa.table({
        "t": pa.array(np.zeros(n, "datetime64[us]")),
        "a": pa.array(np.zeros(n, np.int8)), "b": pa.array(np.zeros(n, np.int8)),
        "city": pa.array(["x"] * n), "amount": pa.array(amount, pa.float64()), "age": pa.array(age, pa.float64()),
    })
    return Dataset(SPEC, table)


def test_parse_numerical_encoding_accepts_the_three_and_names_a_bad_one():
    assert parse_numerical_encoding("log_round") == ("log_round", 0)
    assert parse_numerical_encoding("dense_log") == ("dense_log", 0)
    assert parse_numerical_encoding("quantile:32") == ("quantile", 32)
    for bad in ("quantile", "quantile:1", "quantile:x", "dense_log:3", "onehot"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_numerical_encoding(bad)


def test_signed_log_values_and_explicit_cases():
    x = np.array([0.0, 1.0, -1.0, np.e - 1, np.nan, np.inf, -np.inf])
    got = signed_log(x)
    assert got[0] == 0.0 and got[1] == pytest.approx(np.log(2)) and got[2] == pytest.approx(-np.log(2))
    assert got[3] == pytest.approx(1.0)
    assert got[4] == 0.0  # missing is the NaN bucket's job
    assert got[5] == 50.0 and got[6] == -50.0


def test_quantile_bins_are_equal_frequency_on_train_and_nan_has_its_own_code():
    values = np.arange(1000, dtype=np.float64)
    edges = quantile_edges(values, 4)
    codes = quantile_codes(values, edges)
    assert np.bincount(codes).tolist() == [250, 250, 250, 250]
    assert quantile_codes(np.array([np.nan, -np.inf, np.inf]), edges).tolist() == [NAN_CODE, 0, 3]
    assert len(quantile_edges(np.zeros(100), 8)) == 1  # ties merge bins instead of making empty ones


def test_log_round_encoder_is_unchanged_and_has_no_dense_columns():
    train = _dataset(np.linspace(0, 1e5, 400), np.arange(400) % 80)
    encoder = FeatureEncoder(SPEC, min_frequency=1).fit(train)
    assert encoder.numerical_encoding == "log_round"
    assert encoder.input_width == 3 and not any(f.dense for f in encoder.fields)
    assert encoder.transform(train.table).shape == (400, 3)
    assert np.array_equal(encoder.numerical_vocab["amount"], np.unique(log_round(np.linspace(0, 1e5, 400))))


def test_dense_log_appends_fixed_point_signed_log_columns():
    amount = np.array([0.0, 1000.0, 1001.0, -5.0, np.nan] * 20)
    train = _dataset(amount, np.full(100, 30.0))
    encoder = FeatureEncoder(SPEC, numerical_encoding="dense_log").fit(train)
    assert encoder.dense_fields == ["amount", "age"] and encoder.input_width == 5
    assert [f.dense for f in encoder.fields] == [False, True, True]
    x = encoder.transform(train.table)
    np.testing.assert_allclose(x[:5, 3] / DENSE_SCALE, signed_log(amount[:5]), atol=1 / DENSE_SCALE)
    # 1000 and 1001 share a log_round bucket: only the dense column tells them apart
    assert x[1, 1] == x[2, 1] and x[1, 3] != x[2, 3]
    assert np.all(x[:, 4] == np.round(np.log1p(30.0) * DENSE_SCALE))


@pytest.mark.parametrize("encoding", ["log_round", "dense_log", "quantile:8"])
def test_each_encoding_round_trips_through_json(encoding):
    rng = np.random.default_rng(0)
    amount = rng.lognormal(5, 2, 500)
    amount[::50] = np.nan
    train = _dataset(amount, rng.integers(18, 90, 500).astype(float))
    encoder = FeatureEncoder(SPEC, numerical_encoding=encoding).fit(train)
    state = json.loads(json.dumps(encoder.to_dict()))
    assert state["format_version"] == 2 and state["numerical_encoding"] == encoding
    again = FeatureEncoder.from_dict(state)
    assert again.fields == encoder.fields
    assert np.array_equal(again.transform(train.table), encoder.transform(train.table))


def test_quantile_encoder_fits_edges_on_train_only():
    train = _dataset(np.arange(800, dtype=float), np.arange(800, dtype=float))
    encoder = FeatureEncoder(SPEC, numerical_encoding="quantile:4").fit(train)
    assert encoder.quantile_edges["amount"].tolist() == pytest.approx([199.75, 399.5, 599.25])
    later = _dataset(np.array([-1e9, 250.0, 1e9]), np.zeros(3))
    indices = encoder.transform(later.table)[:, 1]
    assert indices.tolist() == [1, 2, 4]  # below, inside and above the train range: outer bins, not OOV


def test_version_1_feature_state_still_loads_as_log_round():
    train = _dataset(np.linspace(0, 1e4, 200), np.arange(200) % 50)
    state = FeatureEncoder(SPEC).fit(train).to_dict()
    del state["numerical_encoding"], state["quantile_edges"]
    state["format_version"] = 1
    old = FeatureEncoder.from_dict(state)
    assert old.numerical_encoding == "log_round"
    assert np.array_equal(old.transform(train.table), FeatureEncoder(SPEC).fit(train).transform(train.table))
    state["format_version"] = 3
    with pytest.raises(ValueError, match="format version 3"):
        FeatureEncoder.from_dict(state)
