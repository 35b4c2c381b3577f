"""Per-field embedding weight decay: off by default, shrinks the fields it names, reported per epoch."""

import pytest
import torch

from apem.data.encoding import FeatureEncoder
from apem.data.features import default_spec
from apem.data.spec import Dataset
from apem.models import build_model
from apem.research.synth import SynthConfig, generate
from apem.train.trainer import TrainConfig, encode_dataset, fit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    table, _ = generate(SynthConfig(rows=3_000, days=3, seed=2))
    train = Dataset(default_spec(), table)
    encoder = FeatureEncoder(default_spec()).fit(train)
    return encoder, encode_dataset(train, encoder)


def _train(data, **regularisation):
    encoder, train = data
    torch.manual_seed(0)
    model = build_model("shared_bottom", encoder.fields, 3)
    result = fit(model, train, None, TrainConfig(epochs=2, batch_size=256, progress=False, **regularisation))
    return result.history


def test_named_field_shrinks_and_the_penalty_is_in_the_history(data):
    plain = _train(data)
    regularised = _train(data, embedding_l2_fields={"user_id": 0.5})
    assert "train_embedding_penalty" not in plain[-1]  # default off
    assert regularised[-1]["train_embedding_penalty"] > 0
    before, after = plain[-1]["embedding_row_norms"], regularised[-1]["embedding_row_norms"]
    assert after["user_id"] < 0.85 * before["user_id"]  # lazy decay: each user row is seen a few times
    assert after["channel"] > 0.8 * before["channel"]  # other fields are left alone


def test_all_fields_coefficient_and_bad_settings(data):
    everywhere = _train(data, embedding_l2=0.5)
    plain = _train(data)
    assert all(everywhere[-1]["embedding_row_norms"][n] < plain[-1]["embedding_row_norms"][n]
               for n in ("user_id", "channel", "balance"))
    with pytest.raises(ValueError, match="nosuch"):
        _train(data, embedding_l2_fields={"nosuch": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(embedding_l2=-1.0)
