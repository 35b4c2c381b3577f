import math

import pytest
import torch

from apem.nn.layers import (DISTINCT_BY_FLAGS, MLP, FieldEmbedding, TaskTowers, layer_norm, rowwise_layer_norm,
                             uses_rowwise_layer_norm)
from apem.nn.attention import (InducingPointAttention, PatternSelector, multihead_attention, row_attention_pool,
                                weighted_softmax)
from apem.nn import native
from apem.nn.selection import dynamic_activation, gamma_at
from apem.data.encoding import FieldSpec

torch.set_num_threads(1)


def test_dynamic_activation_known_values():
    gamma = 2.0
    z = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    # eq. 13 by hand at gamma = 2: -z^3/4 + 3z/4 + 1/2 on (-1, 1); -0.5 -> 0.15625, 0.5 -> 0.84375
    expected = [0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0]
    out = dynamic_activation(z, gamma)
    assert out.tolist() == pytest.approx(expected, abs=1e-7)
    assert out[0] == 0.0 and out[-1] == 1.0  # exact zeros and ones, so z_K is sparse
    # near-binary at the floor gamma = 1e-3
    sharp = dynamic_activation(torch.tensor([-0.01, -1e-4, 1e-4, 0.01]), 1e-3)
    assert sharp.tolist() == pytest.approx([0.0, 0.5 - 0.1 * (1.5 - 0.02), 0.5 + 0.1 * (1.5 - 0.02), 1.0], abs=1e-6)


def test_dynamic_activation_gradient_vanishes_outside_the_ramp():
    z = torch.tensor([-3.0, 0.0, 3.0], requires_grad=True)
    dynamic_activation(z, 2.0).sum().backward()
    assert z.grad.tolist() == pytest.approx([0.0, 3 / (2 * 2.0), 0.0])


def test_gamma_schedule():
    assert gamma_at(0) == 10.0
    assert gamma_at(100, start=10.0, decay=0.05, minimum=1e-3) == pytest.approx(5.0)
    assert gamma_at(10**6) == 1e-3


def test_multihead_attention_matches_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    ours = multihead_attention(q, k, v, heads=2)
    split = lambda t: t.view(3, -1, 2, 4).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    assert torch.allclose(ours, ref.transpose(1, 2).reshape(3, 5, 8), atol=1e-5)


def _naive_asrg(layer_module, source, mask, layer):
    """Eq. 14-17 written out literally for one layer: Q_hat = I * z, K = S W^K, V = S W^V + b, O = concat W^O."""
    inducing = layer_module.inducing[layer]
    q_hat = inducing.unsqueeze(0) * mask.unsqueeze(-1)  # (B, K, d)
    keys = source @ layer_module.attention.w_key[layer]
    values = source @ layer_module.attention.w_value[layer] + layer_module.attention.b_value[layer]
    o = multihead_attention(q_hat, keys, values, layer_module.heads) @ layer_module.attention.w_out[layer] + layer_module.attention.b_out[layer]
    norm = layer_module.norm
    return torch.nn.functional.layer_norm(q_hat + o, (q_hat.shape[-1],)) * norm.weight[layer] + norm.bias[layer]


def test_inducing_point_attention_matches_literal_equations():
    torch.manual_seed(0)
    att = InducingPointAttention(n_layers=3, n_points=5, dim=6, heads=2)
    with torch.no_grad():
        for p in att.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    source = torch.randn(4, 7, 6)
    mask = torch.rand(4, 3, 5)
    mask[:, :, 0] = 0.0
    y = att(source, mask)
    assert y.shape == (3, 4, 5, 6)
    for layer in range(3):
        assert torch.allclose(y[layer], _naive_asrg(att, source, mask[:, layer], layer), atol=1e-5)
    one = att(source, mask[:, 1:2], slice(1, 2))
    assert torch.allclose(one[0], y[1], atol=1e-6)


def test_masked_query_attends_uniformly():
    torch.manual_seed(1)
    att = InducingPointAttention(n_layers=1, n_points=4, dim=4, heads=1)
    source = torch.randn(2, 5, 4)
    y = att(source, torch.zeros(2, 1, 4))
    # z_K = 0: Q_hat = 0, softmax of equal scores averages the values, and the residual is zero
    mean_value = source.mean(dim=1) @ att.attention.w_value[0] + att.attention.b_value[0]
    o = mean_value @ att.attention.w_out[0] + att.attention.b_out[0]
    expected = torch.nn.functional.layer_norm(o, (4,)).unsqueeze(1).expand(2, 4, 4)
    assert torch.allclose(y[0], expected, atol=1e-5)


def test_pattern_selector_matches_literal_equations():
    torch.manual_seed(2)
    ps = PatternSelector(n_layers=3, n_tasks=2, dim=6, heads=2)
    with torch.no_grad():
        for p in ps.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    shared = torch.randn(3, 4, 5, 6)
    t = None
    for layer in range(3):
        keys = shared[layer] @ ps.attention.w_key[layer]
        values = shared[layer] @ ps.attention.w_value[layer] + ps.attention.b_value[layer]
        alpha = ps.indicator[layer].unsqueeze(0).expand(4, 2, 6)
        f = multihead_attention(alpha, keys, values, 2) @ ps.attention.w_out[layer] + ps.attention.b_out[layer]  # eq. 18
        pre = f if t is None else t + f  # eq. 19, T^0 ignored
        t = torch.nn.functional.layer_norm(pre, (6,)) * ps.norm.weight[layer] + ps.norm.bias[layer]
    assert torch.allclose(ps(shared), t, atol=1e-5)


def test_pattern_selector_without_indicators_is_task_agnostic():
    ps = PatternSelector(n_layers=2, n_tasks=3, dim=4, heads=2, task_indicators=False)
    out = ps(torch.randn(2, 5, 7, 4))
    assert out.shape == (5, 3, 4)
    assert torch.allclose(out[:, 0], out[:, 2])


def test_task_towers_are_independent_mlps():
    torch.manual_seed(3)
    towers = TaskTowers(n_tasks=3, in_dim=4, hidden=[5])
    x = torch.randn(6, 3, 4)
    out = towers(x)
    assert out.shape == (6, 3)
    w0, w1 = towers.weights
    b0, b1 = towers.biases
    expected = torch.relu(x[:, 1] @ w0[1] + b0[1]) @ w1[1] + b1[1]
    assert torch.allclose(out[:, 1], expected.squeeze(-1), atol=1e-6)


def test_field_embedding_and_mlp_shapes():
    emb = FieldEmbedding([FieldSpec("a", 3), FieldSpec("b", 5)], dim=4)
    x = torch.tensor([[0, 0], [2, 4]])
    h = emb(x)
    assert h.shape == (2, 2, 4)
    assert torch.equal(h[1, 1], emb.embedding.weight[3 + 4])  # field offset 3
    assert MLP(8, [16, 4], out_dim=2)(h.flatten(1)).shape == (2, 2)
    assert math.isfinite(float(h.detach().sum()))


def test_field_embedding_distinct_rows_rebuild_the_lookup():
    emb = FieldEmbedding([FieldSpec("a", 3), FieldSpec("b", 5)], dim=4)
    x = torch.tensor([[0, 0], [2, 4], [0, 4], [0, 0]])
    rows, index = emb.distinct_rows(x)
    assert rows.shape == (4, 4) and index.shape == (4, 2)  # 4 distinct table rows among 8 lookups
    assert torch.equal(rows[index], emb(x))
    dense = FieldEmbedding([FieldSpec("a", 3), FieldSpec("v", 5, dense=True)], dim=4)
    assert dense.distinct_rows(torch.tensor([[0, 1, 100]])) is None  # a dense field's row depends on its value


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch"])
@pytest.mark.parametrize("cardinality", [5, 5000], ids=["flags", "sort"])
def test_field_embedding_distinct_rows_are_torch_uniques(monkeypatch, cardinality, kernels):
    """Every way of finding the distinct rows (flags over a small table, in C where the kernels are built, else in
    torch; a sort of the entries over a large one) gives torch.unique's rows, in its order, and its inverse, also from
    a strided view of a wider input."""
    monkeypatch.setenv(native.DISABLE_ENV, kernels)
    emb = FieldEmbedding([FieldSpec("a", 3), FieldSpec("b", cardinality)], dim=4)
    gen = torch.Generator().manual_seed(2)
    wide = torch.stack([torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 5, (40,), generator=gen)] * 2,
                       dim=1)
    for x in (wide[:, :2].contiguous(), wide[::2, 1:3]):
        assert (emb.embedding.num_embeddings <= DISTINCT_BY_FLAGS * x.numel()) == (cardinality == 5)
        rows, index = emb.distinct_rows(x)
        distinct, inverse = torch.unique(x[:, :2] + emb.offsets, return_inverse=True)
        assert torch.equal(rows, emb.embedding(distinct)) and torch.equal(index, inverse)


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch"])
@pytest.mark.parametrize("row", [[-1, 0], [2, 3]], ids=["negative", "past-the-last-field"])
def test_field_embedding_distinct_rows_refuse_a_lookup_outside_the_table(monkeypatch, row, kernels):
    """A lookup outside the table (below its first row, or past the last field's rows) raises IndexError on both
    paths, as the direct lookup does, instead of the C pass writing outside its flags or torch's wrapping around."""
    monkeypatch.setenv(native.DISABLE_ENV, kernels)
    emb = FieldEmbedding([FieldSpec("a", 3), FieldSpec("b", 3)], dim=4)
    x = torch.tensor([[0, 1], row])
    with pytest.raises(IndexError):
        emb(x)
    with pytest.raises(IndexError):
        emb.distinct_rows(x)


def _assert_same_outputs_and_gradients(fast, reference, inputs) -> None:
    """fast() and reference() agree to 1e-5 in output and in the gradient of every input (one random
    upstream gradient), and fast() gives the same output without autograd."""
    results = []
    for run in (fast, reference):
        out = run()
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        results.append((out, torch.autograd.grad((out * upstream).sum(), inputs)))
    (fast_out, fast_grads), (reference_out, reference_grads) = results
    torch.testing.assert_close(fast_out, reference_out, atol=1e-5, rtol=0)
    for a, b in zip(fast_grads, reference_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(), reference_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch"])
def test_inducing_point_attention_over_distinct_rows_matches_the_direct_path(monkeypatch, kernels):
    """``index``: the source is rows[index]; outputs and every gradient equal the direct path's,
    with repeated rows, a soft mask with exact zeros, and non-zero value/output biases, through the
    C kernels (apem.nn.native_pools) and through the torch path."""
    monkeypatch.setenv("APEM_NATIVE_KERNELS", kernels)
    torch.manual_seed(3)
    att = InducingPointAttention(n_layers=3, n_points=5, dim=6, heads=2)
    with torch.no_grad():
        for p in att.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    rows, index = torch.randn(9, 6, requires_grad=True), torch.randint(0, 9, (8, 7))
    mask = torch.rand(8, 3, 5)
    mask[:, :, 0] = 0.0
    mask[:, 1, 2] = 1.0
    mask.requires_grad_(True)
    _assert_same_outputs_and_gradients(lambda: att(rows, mask, index=index), lambda: att(rows[index], mask),
                                       (rows, mask, *att.parameters()))


def _row_attention_pool_autograd(shared, factor, row_weights):
    """The plain autograd formulation :func:`row_attention_pool` replaces (PatternSelector before it)."""
    n, b, r, d = shared.shape
    scores = torch.bmm(shared.reshape(n, b * r, d), factor).view(n * b, r, factor.shape[2])
    weights = torch.softmax(scores, dim=1) if row_weights is None else \
        weighted_softmax(scores, row_weights.reshape(n * b, r, 1), dim=1)
    return torch.bmm(weights.transpose(1, 2), shared.reshape(n * b, r, d))


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["c-kernels", "torch"])
@pytest.mark.parametrize("row_weights", ["none", "soft", "binary"])
def test_row_attention_pool_matches_autograd_in_outputs_and_gradients(monkeypatch, row_weights, kernels):
    monkeypatch.setenv("APEM_NATIVE_KERNELS", kernels)
    torch.manual_seed(4)
    shared, factor = torch.randn(3, 6, 7, 5, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True)
    inputs, z = [shared, factor], None
    if row_weights != "none":
        z = torch.rand(3, 6, 7)
        z = (z > 0.4).float() if row_weights == "binary" else z.masked_fill(z < 0.2, 0.0)
        z[..., 0] = 1.0  # every sample keeps a row (all-zero rows are the reference's NaN-gradient case)
        inputs.append(z.requires_grad_(True))
    _assert_same_outputs_and_gradients(lambda: row_attention_pool(shared, factor, z),
                                       lambda: _row_attention_pool_autograd(shared, factor, z), inputs)


@pytest.mark.parametrize("affine", [True, False])
def test_rowwise_layer_norm_matches_torch_in_outputs_and_gradients(affine: bool) -> None:
    """The GPU's narrow-row LayerNorm (apem.nn.layers.layer_norm) is torch's to float rounding, gradients too."""
    torch.manual_seed(0)
    x = (torch.randn(4, 300, 18) * 3 + 1).requires_grad_()
    weight = torch.randn(18, requires_grad=True) if affine else None
    bias = torch.randn(18, requires_grad=True) if affine else None
    grad = torch.randn(4, 300, 18)
    inputs = [t for t in (x, weight, bias) if t is not None]
    ours = rowwise_layer_norm(x, weight, bias, 1e-5)
    expected = torch.nn.functional.layer_norm(x, (18,), weight, bias, 1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_layer_norm_takes_the_rowwise_form_only_for_narrow_rows_off_the_cpu() -> None:
    # "meta" stands in for a GPU, which CI has none of; the CPU keeps torch's fused kernel
    assert uses_rowwise_layer_norm(torch.empty(8, 18, device="meta"))
    assert not uses_rowwise_layer_norm(torch.empty(8, 64, device="meta"))
    assert not uses_rowwise_layer_norm(torch.empty(8, 18))
    x = torch.randn(8, 18)
    torch.testing.assert_close(layer_norm(x), torch.nn.functional.layer_norm(x, (18,)))
