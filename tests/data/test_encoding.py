import json

import numpy as np
import pyarrow as pa
import pytest

from apem.data.encoding import MAX_LOG_BUCKET, NAN_CODE, OOV_INDEX, FeatureEncoder, log_round
from apem.data.spec import Dataset, DatasetError, DatasetSpec

SPEC = DatasetSpec(time_column="t", labels=("a", "b"), categorical=("city", "slot"), numerical=("amount",))


def _table(city, slot, amount):
    n = len(city)
    return pa.table({
        "t": pa.array(np.zeros(n, "datetime64[us]")),
        "a": pa.array(np.zeros(n, np.int8)), "b": pa.array(np.zeros(n, np.int8)),
        "city": pa.array(city), "slot": pa.array(slot, pa.int64()), "amount": pa.array(amount, pa.float64()),
    })


def test_log_round_known_values_and_explicit_cases():
    x = np.array([0.0, 0.5, 1.0, 2.0, 10.0, 1000.0, -1000.0, np.nan, np.inf, -np.inf, 1e300])
    codes = log_round(x)
    # sign(x) * (1 + floor(ln(1+|x|)^2)); zero and NaN are their own codes
    assert codes[0] == 0
    assert codes[1] == 1 and codes[2] == 1  # ln(1.5)^2 = 0.16, ln(2)^2 = 0.48
    assert codes[3] == 2  # ln(3)^2 = 1.21
    assert codes[4] == 1 + int(np.floor(np.log(11.0) ** 2))  # 5.75 -> 6
    assert codes[5] == 1 + int(np.floor(np.log(1001.0) ** 2)) == 48
    assert codes[6] == -codes[5]
    assert codes[7] == NAN_CODE
    assert codes[8] == 1 + MAX_LOG_BUCKET and codes[9] == -(1 + MAX_LOG_BUCKET) and codes[10] == 1 + MAX_LOG_BUCKET
    assert codes.dtype == np.int64


def test_log_round_is_monotone_in_magnitude():
    x = np.linspace(0, 1e6, 10_000)
    assert np.all(np.diff(log_round(x)) >= 0)


def test_encoder_vocab_oov_min_frequency_and_nulls():
    train = _table(["x", "x", "y", "y", "z", None], [1, 1, 2, 2, 3, 3], [0.0, 0.0, 5.0, 5.0, np.nan, np.nan])
    enc = FeatureEncoder(SPEC, min_frequency=2).fit(Dataset(SPEC, train))
    assert [f.name for f in enc.fields] == ["city", "slot", "amount"]
    # city: x, y kept (z seen once), OOV -> 3; slot: 1, 2, 3 -> 4; amount: NaN, 0, code(5) -> 4
    assert [f.cardinality for f in enc.fields] == [3, 4, 4]
    test = _table(["y", "z", "unseen", None], [3, 9, 1, 2], [5.0, np.nan, -7.0, 0.0])
    x = enc.transform(test)
    assert x.dtype == np.int64 and x.shape == (4, 3)
    assert x[0, 0] == 2 and x[1, 0] == OOV_INDEX and x[2, 0] == OOV_INDEX and x[3, 0] == OOV_INDEX
    assert x[1, 1] == OOV_INDEX and x[0, 1] == 3 and x[2, 1] == 1
    assert x[1, 2] == 1 and x[3, 2] == 2 and x[0, 2] == 3 and x[2, 2] == OOV_INDEX  # NaN, 0, 5, unseen -7
    assert (x < np.array([f.cardinality for f in enc.fields])).all()


def test_dictionary_and_plain_columns_encode_identically():
    train = _table(["a", "b", "b", "c", "c", "c"], [1] * 6, [1.0] * 6)
    enc = FeatureEncoder(SPEC, min_frequency=1).fit(Dataset(SPEC, train))
    plain = _table(["c", "zz", "a", None, "b"], [1] * 5, [1.0] * 5)
    dictionary = plain.set_column(plain.schema.get_field_index("city"), "city",
                                  pa.chunked_array([plain.column("city").combine_chunks().dictionary_encode()]))
    assert np.array_equal(enc.transform(plain), enc.transform(dictionary))
    assert enc.transform(plain)[:, 0].tolist() == [3, 0, 1, 0, 2]


def test_state_round_trips_through_json():
    train = _table(["x", "x", "y", "y"], [1, 1, 2, 2], [0.0, 0.0, -3.0, -3.0])
    enc = FeatureEncoder(SPEC).fit(Dataset(SPEC, train))
    again = FeatureEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    test = _table(["y", "q"], [2, 7], [-3.0, 8.0])
    assert again.fields == enc.fields
    assert np.array_equal(again.transform(test), enc.transform(test))


def test_missing_column_and_wrong_type_are_clear_errors():
    train = _table(["x", "x"], [1, 1], [1.0, 1.0])
    enc = FeatureEncoder(SPEC).fit(Dataset(SPEC, train))
    with pytest.raises(DatasetError, match="amount"):
        enc.transform(train.drop(["amount"]))
    bad = train.set_column(train.schema.get_field_index("slot"), "slot", pa.array(["one", "two"]))
    with pytest.raises(DatasetError, match="slot"):
        enc.transform(bad)
    with pytest.raises(ValueError, match="format version"):
        FeatureEncoder.from_dict({**enc.to_dict(), "format_version": 99})
