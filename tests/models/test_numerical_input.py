"""Every registry model reads the dense_log value through the shared FieldEmbedding."""

import pytest
import torch

from apem.data.encoding import DENSE_SCALE, FieldSpec
from apem.models import build_model, list_models

torch.set_num_threads(1)


def _fields(dense: bool):
    return [FieldSpec("city", 5), FieldSpec("amount", 7, dense=dense), FieldSpec("age", 4, dense=dense)]


def _two_rows_differing_only_in_amount(dense: bool) -> torch.Tensor:
    rows = torch.tensor([[1, 3, 2], [1, 3, 2]])
    if not dense:
        return rows
    values = torch.tensor([[round(6.9 * DENSE_SCALE), round(3.4 * DENSE_SCALE)],
                           [round(7.6 * DENSE_SCALE), round(3.4 * DENSE_SCALE)]])
    return torch.cat([rows, values], dim=1)


@pytest.mark.parametrize("name", list_models())
def test_dense_log_value_changes_every_models_output(name):
    torch.manual_seed(0)
    model = build_model(name, _fields(dense=True), 3).eval()
    with torch.no_grad():
        probs = model(_two_rows_differing_only_in_amount(dense=True)).probs
    assert probs.shape == (2, 3)
    assert not torch.allclose(probs[0], probs[1], rtol=0, atol=1e-7), name


def test_without_dense_fields_same_indices_give_same_output_and_no_new_parameters():
    torch.manual_seed(0)
    plain = build_model("shared_bottom", _fields(dense=False), 3).eval()
    with torch.no_grad():
        probs = plain(_two_rows_differing_only_in_amount(dense=False)).probs
    assert torch.equal(probs[0], probs[1])
    assert "embedding.dense_vectors" not in plain.state_dict()  # older model directories keep loading
    dense = build_model("shared_bottom", _fields(dense=True), 3)
    assert dense.state_dict()["embedding.dense_vectors"].shape == (2, dense.config.embed_dim)


def test_dense_term_is_signed_log_times_the_fields_vector():
    from apem.nn.layers import FieldEmbedding

    emb = FieldEmbedding(_fields(dense=True), 4)
    x = _two_rows_differing_only_in_amount(dense=True)
    h, rows = emb(x), emb.rows(x)
    torch.testing.assert_close(h[:, 0], rows[:, 0])  # categorical: the row alone
    torch.testing.assert_close(h[1, 1] - rows[1, 1], (x[1, 3] / DENSE_SCALE) * emb.dense_vectors[0])
    torch.testing.assert_close(h[0, 2] - rows[0, 2], (x[0, 4] / DENSE_SCALE) * emb.dense_vectors[1])
