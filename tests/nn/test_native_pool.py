"""The C kernels of APEM's attention poolings (apem/resources/kernels, apem.nn.native_pools) against
their torch reference paths (APEM_NATIVE_KERNELS=0): outputs and every gradient to 1e-5, at Table 2's
sizes (the AVX2 loops) and at odd sizes (the portable loops), on 1 and 2 threads, in the portable
build, and through a trained APEM; and the fallbacks when no kernel can be built."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from apem.models.registry import build_model
from apem.nn import native
from apem.nn.attention import PatternSelector, gathered_pool_norm, row_attention_pool
from apem.nn.native_pools import (NativeGatheredPoolNorm, fused_predict, kept_points, native_dynamic_activation,
                                  native_library, pattern_chain_pooled, pattern_pool, row_pool_backward,
                                  row_pool_forward, typed_library, value_table)
from apem.nn.selection import deselected, dynamic_activation
from apem.research.synth import SynthConfig, write_synthetic_dataset
from apem.data.spec import read_dataset
from apem.data.encoding import FeatureEncoder, FieldSpec
from apem.train.trainer import TrainConfig, encode_dataset, fit

# skipped only without a compiler: where there is one, a kernel that fails to build must fail these tests (the models
# would fall back to the torch path without a word), not skip them
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler to build the kernels")


def test_the_kernels_build_with_the_compiler_here():
    assert native.load_kernels() is not None


def _both_paths(monkeypatch, run):
    """run() with the kernels, then with the torch reference path."""
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(native.DISABLE_ENV, enabled)
        results.append(run())
    return results


def _outputs_and_gradients(fn, inputs, seed=5):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs)


def _assert_close(fast, reference):
    (fast_outs, fast_grads), (ref_outs, ref_grads) = fast, reference
    for a, b in zip(fast_outs, ref_outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads):  # sums over the batch: 1e-5 of the gradient's scale
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def _gathered_inputs(u, b, s, layers, heads, k, d, seed=0):
    """rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias of :func:`gathered_pool_norm`."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(u, d, generator=gen).requires_grad_()
    index = torch.randint(0, u, (b, s), generator=gen)
    factor = (torch.randn(layers, d, heads * k, generator=gen) * 0.5).requires_grad_()
    mask = torch.rand(layers, b, k, generator=gen).transpose(0, 1)
    mask[:, :, 0] = 0.0  # de-selected points (uniform weights) and fully selected ones
    mask[:, 0, 1] = 1.0
    mask = mask.contiguous().requires_grad_()
    combined = (torch.randn(layers, d, heads * d, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(layers, 1, d, generator=gen).requires_grad_()
    queries = torch.randn(layers, k, d, generator=gen).requires_grad_()
    norm_weight = (1 + 0.3 * torch.randn(layers, d, generator=gen)).requires_grad_()
    norm_bias = (0.3 * torch.randn(layers, d, generator=gen)).requires_grad_()
    return rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sizes", [(300, 200, 16, 4, 2, 64, 18), (40, 70, 5, 2, 3, 12, 7)],
                         ids=["table2-avx2", "odd-portable"])
def test_gathered_pool_norm_kernel_matches_the_torch_path(monkeypatch, sizes, threads):
    """Eq. 14-17 (the pooling, the residual and the LayerNorm) through the kernel and through torch."""
    inputs = _gathered_inputs(*sizes)
    heads = sizes[4]
    params = [t for t in inputs if t.requires_grad]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, reference = _both_paths(monkeypatch, lambda: _outputs_and_gradients(
            lambda: gathered_pool_norm(*inputs, heads, 1e-5), params))
        monkeypatch.setenv(native.DISABLE_ENV, "1")
        with torch.no_grad():  # the inference branch takes the kernel too
            no_grad = gathered_pool_norm(*inputs, heads, 1e-5)
    finally:
        torch.set_num_threads(previous)
    _assert_close(fast, reference)
    torch.testing.assert_close(no_grad, reference[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row_weights", ["none", "binary-with-empty-sample"])
@pytest.mark.parametrize("sizes", [(4, 130, 64, 6, 18), (2, 9, 7, 4, 5)], ids=["table2-avx2", "odd-portable"])
def test_row_attention_pool_kernel_matches_the_torch_path(monkeypatch, sizes, row_weights, threads):
    n, b, r, q, d = sizes
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(n, b, r, d, generator=gen).requires_grad_()
    factor = torch.randn(n, d, q, generator=gen).requires_grad_()
    inputs, z = [shared, factor], None
    if row_weights != "none":
        z = (torch.rand(n, b, r, generator=gen) > 0.4).float()
        z[:, 0] = 0.0  # a sample with no selected row: an empty message, not NaN
        inputs.append(z.requires_grad_())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, reference = _both_paths(monkeypatch, lambda: _outputs_and_gradients(
            lambda: row_attention_pool(shared, factor, z), inputs))
    finally:
        torch.set_num_threads(previous)
    assert torch.isfinite(fast[0][0]).all()
    _assert_close(fast, reference)


def _pattern_pool_inputs(u, b, s, heads, k, d, q, z_kind, seed=0):
    """:func:`pattern_pool`'s stacked inputs for 2 layers of K points (as :func:`_gathered_inputs`', with z_K soft or,
    as after the annealing, binary with 3% fractional entries), its eq. 18 factor (2, d, Q), and per layer the points
    it computes with eq. 18's counts, as :func:`computed_points` makes them: layer 0 every point (columns None),
    layer 1 the first half, then one point standing for the 5 others (counted 5) and a repeat of it (padding, counted
    0). Sample 1 selects no point (its z_K is all 0)."""
    rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias = _gathered_inputs(u, b, s, 2, heads, k,
                                                                                                 d, seed)
    mask = mask.detach().clone()
    if z_kind == "binary":
        gen = torch.Generator().manual_seed(seed + 2)
        fractional = torch.rand(mask.shape, generator=gen) < 0.03
        mask = torch.where(fractional, mask, (torch.rand(mask.shape, generator=gen) > 0.4).float())
    mask[1] = 0.0
    pattern_factor = torch.randn(2, d, q, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
    half = torch.arange(k // 2)
    columns = torch.cat([half, torch.tensor([k - 1, k - 1])])
    counts = torch.cat([torch.ones(k // 2), torch.tensor([5.0, 0.0])])
    plans = [(None, torch.ones(k)), (columns, counts)]
    return (rows, index, factor, mask.requires_grad_(), combined, bias, queries, norm_weight, norm_bias,
            pattern_factor), plans


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weighting", ["none", "counts", "z"])
@pytest.mark.parametrize("z_kind", ["soft", "binary"])
@pytest.mark.parametrize("sizes", [(300, 200, 16, 2, 64, 18, 6), (40, 70, 5, 3, 12, 7, 4)],
                         ids=["table2-avx2", "odd-portable"])
def test_pattern_pool_kernel_matches_the_torch_path(monkeypatch, sizes, z_kind, weighting, threads):
    """Training's one kernel of eq. 14-18 per layer (pattern_pool: Y stays in cache from eq. 17 to eq. 18, and its
    gradient from eq. 18 back into eq. 17) against gathered_pool_norm and then row_attention_pool on the torch path
    over the same points, for each of eq. 18's row weights: none, counts shared by every sample, and z_K itself
    (whose gradient then has eq. 14's and eq. 18's shares); z_K soft, or binary (the softmax weights from a table of
    exps, a few fractional entries fixed up). Outputs and every gradient (the stacked parameters' at each layer's
    points, a repeated point's shares added), on 1 and 2 threads."""
    heads, k, d = sizes[3], sizes[4], sizes[5]
    inputs, plans = _pattern_pool_inputs(*sizes, z_kind)
    rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias, pattern_factor = inputs
    params = [t for t in inputs if t.requires_grad]
    b = mask.shape[0]

    def fused():
        return pattern_pool(native_library(rows), rows, index, factor, mask, combined, bias, queries, norm_weight,
                            norm_bias, pattern_factor,
                            [(c, counts if weighting == "counts" else None) for c, counts in plans], weighting == "z",
                            heads, 1e-5)

    def reference():
        pooled = []
        for layer, (columns, counts) in enumerate(plans):
            columns, one = torch.arange(k) if columns is None else columns, slice(layer, layer + 1)
            layer_factor = factor[one].view(1, d, heads, k).index_select(3, columns).view(1, d, -1)
            z = mask[:, layer].index_select(1, columns)
            shared = gathered_pool_norm(rows, index, layer_factor, z.unsqueeze(1), combined[one], bias[one],
                                        queries[one].index_select(1, columns), norm_weight[one], norm_bias[one],
                                        heads, 1e-5)
            row_weights = {"none": None, "counts": counts.expand(1, b, -1), "z": z.unsqueeze(0)}[weighting]
            pooled.append(row_attention_pool(shared, pattern_factor[one], row_weights))
        return torch.cat(pooled)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = _outputs_and_gradients(fused, params)
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        slow = _outputs_and_gradients(reference, params)
    finally:
        torch.set_num_threads(previous)
    assert torch.isfinite(fast[0][0]).all()
    if weighting == "z":  # the sample that selects nothing: an empty message, as weighted_softmax gives
        assert (fast[0][0].view(2, b, -1, d)[:, 1] == 0).all()
        # and its eq. 18 weights are 0 / 0, whose derivative in z is unbounded on both paths (in a model z = 0 comes
        # from f_D's clamp, whose derivative there is 0, so it reaches no parameter): compared for the other samples
        which = next(i for i, t in enumerate(params) if t is mask)
        for _, grads in (fast, slow):
            assert not torch.isfinite(grads[which][1]).all()
            grads[which][1] = 0.0
    _assert_close(fast, slow)


def test_pattern_pool_softmax_holds_where_a_samples_scores_span_more_than_exps_range(monkeypatch):
    """Eq. 18's scores spread over hundreds within a sample (a large factor): the kernel's softmax must subtract each
    query's true maximum (taken 8 queries at a time), or the exps overflow to inf. The rows match the torch path's to
    1e-3: at that scale float32's rounding of a score moves its weight by ~1e-4."""
    heads, k, d = 2, 64, 18
    inputs, plans = _pattern_pool_inputs(300, 200, 16, heads, k, d, 6, "binary")
    rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias, pattern_factor = (
        t.detach() for t in inputs)
    pattern_factor = pattern_factor * 100.0
    plans = [(columns, None) for columns, _ in plans]
    with torch.no_grad():
        fast = pattern_pool(native_library(rows), rows, index, factor, mask, combined, bias, queries, norm_weight,
                            norm_bias, pattern_factor, plans, False, heads, 1e-5)
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        shared = gathered_pool_norm(rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias, heads,
                                    1e-5)
        reference = row_attention_pool(shared[:1], pattern_factor[:1])  # layer 0 computes every point
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.view(2, -1)[0], reference.reshape(-1), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
def test_dynamic_activation_kernel_matches_the_torch_path(threads):
    """Eq. 13's f_D through selection.c and through apem.nn.selection.dynamic_activation: the values (exactly 0 and 1
    past the clamp, which the kept points rest on) and the gradient, at soft logits, at the clamp's ends, beyond them
    and at a NaN (whose gradient the clamp stops on both paths)."""
    gen = torch.Generator().manual_seed(4)
    gamma = 0.3
    x = torch.cat([(torch.rand(3000, generator=gen) - 0.5) * 2 * gamma,
                   torch.tensor([-gamma / 2, gamma / 2, -5.0, 5.0, 0.0, float("nan")])]).view(6, 501)
    grad = torch.randn(x.shape, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for f in (lambda t: native_dynamic_activation(native_library(t), t, gamma),
                  lambda t: dynamic_activation(t, gamma)):
            leaf = x.clone().requires_grad_()
            out = f(leaf)
            results.append((out.detach(), torch.autograd.grad(out, leaf, grad)[0]))
    finally:
        torch.set_num_threads(previous)
    (fast, fast_grad), (reference, reference_grad) = results
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0, equal_nan=True)
    assert torch.equal(fast == 0, reference == 0) and torch.equal(fast == 1, reference == 1)
    torch.testing.assert_close(fast_grad, reference_grad, atol=1e-5, rtol=1e-5)


GAMMA = 0.5


def test_kept_points_counts_the_rows_as_deselected_does_and_orders_by_them():
    """The C count of the rows that keep each point (selection.c) against apem.nn.selection.deselected, at the
    clamp's end (-gamma / 2: de-selected), just inside it, beyond it and at a NaN (kept); the kept points come most
    kept first (ties in point order), the others dropped."""
    gamma = 0.3
    gen = torch.Generator().manual_seed(5)
    logits = (torch.rand(300, 2, 16, generator=gen) - 0.7) * gamma
    logits[:5, 0, 3] = torch.tensor([-gamma / 2, float(torch.nextafter(torch.tensor(-gamma / 2), torch.tensor(0.0))),
                                     -5.0, 5.0, float("nan")])
    logits[:, 1, 7] = -gamma  # kept by no row
    expected = (~deselected(logits, gamma)).sum(0)
    for layer, (used, _) in enumerate(kept_points(native_library(logits), logits, gamma, True)):
        counts = expected[layer]
        assert sorted(used.tolist()) == counts.nonzero().view(-1).tolist()
        assert counts[used].tolist() == sorted(counts[used].tolist(), reverse=True)
        # ties in point order (a stable sort), so that the columns do not depend on how the sort is written
        assert used.tolist() == torch.argsort(counts, descending=True, stable=True)[:used.numel()].tolist()
    assert 7 not in kept_points(native_library(logits), logits, gamma, True)[1][0].tolist()


def _predict_logits(kind: str, layers: int, b: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Selector logits (B, L, K) whose z_K = f_D(logits / GAMMA) is of a kind predict meets: binary after the
    annealing (some points kept by no row, some by every row), binary with a few fractional entries, soft
    (gamma not annealed), none kept, all kept."""
    if kind == "none-kept":
        return torch.full((b, layers, k), -GAMMA)
    if kind == "all-kept":
        return torch.full((b, layers, k), GAMMA)
    if kind == "soft":
        logits = (torch.rand(b, layers, k, generator=gen) - 0.5) * GAMMA
        logits[:, :, 0] = -GAMMA
        return logits
    if kind.startswith("eight-kept"):  # the batch keeps points 0-7, each row drops one of them, or one row none
        kept = torch.zeros(b, layers, k, dtype=torch.bool)
        kept[:, :, :8] = torch.rand(b, layers, 8, generator=gen) < 0.7
        rows = torch.arange(b)
        kept[rows, :, rows % 8] = False
        kept[rows, :, (rows + 1) % 8] = True
        if kind == "eight-kept-one-row-all":
            kept[b // 2, :, :8] = True
        return torch.where(kept, 2.0, -2.0) * GAMMA
    kept = torch.rand(b, layers, k, generator=gen) < torch.rand(1, layers, k, generator=gen)
    logits = torch.where(kept, 2.0, -2.0) * GAMMA
    logits[:, :, 1] = -GAMMA  # kept by no row: dropped for the whole batch
    logits[:, :, 2] = GAMMA
    if kind == "binary-and-fractional":
        fractional = torch.rand(b, layers, k, generator=gen) < 0.03
        logits[fractional] = (torch.rand(int(fractional.sum()), generator=gen) - 0.5) * GAMMA
    return logits


def _fused_and_reference(monkeypatch, sizes, kind, uniform, score_scale=0.5, lib=None):
    """fused_predict, and f_D, gathered_pool_norm then row_attention_pool on the torch path, on the same inputs."""
    u, b, s, layers, heads, k, d, q = sizes
    rows, index, factor, _, combined, bias, queries, norm_weight, norm_bias = (
        t.detach() for t in _gathered_inputs(u, b, s, layers, heads, k, d))
    factor = factor * score_scale / 0.5
    gen = torch.Generator().manual_seed(7)
    logits = _predict_logits(kind, layers, b, k, gen)
    pattern_factor = torch.randn(layers, d, q, generator=gen)
    lib = lib or native_library(rows)
    with torch.no_grad():
        fused = fused_predict(lib, rows, index, factor, logits, GAMMA, combined, bias, queries, norm_weight, norm_bias,
                              heads, 1e-5, pattern_factor, uniform)
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        mask = dynamic_activation(logits, GAMMA)
        shared = gathered_pool_norm(rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias, heads,
                                    1e-5)
        reference = row_attention_pool(shared, pattern_factor, None if uniform else mask.transpose(0, 1).contiguous())
        monkeypatch.setenv(native.DISABLE_ENV, "1")
    return fused, reference


PREDICT_MASKS = ["binary", "binary-and-fractional", "soft", "none-kept", "all-kept", "eight-kept-each-row-drops-one",
                 "eight-kept-one-row-all"]


@pytest.mark.parametrize("kind, uniform, columns", [
    ("eight-kept-each-row-drops-one", True, 8),  # each row's own de-selected point holds the dropped points' row
    ("eight-kept-one-row-all", True, 16),        # a row that keeps all 8 needs column 8 for it
    ("eight-kept-one-row-all", False, 8),        # no row for the dropped points under "contributes nothing"
    ("all-kept", True, 64),                      # nothing dropped
    ("none-kept", False, 8),                     # at least one block of 8
])
def test_kept_points_add_a_column_block_only_for_a_row_that_keeps_them_all(kind, uniform, columns):
    logits = _predict_logits(kind, 2, 50, 64, torch.Generator().manual_seed(7))
    assert [c for _, c in kept_points(native_library(logits), logits, GAMMA, uniform)] == [columns] * 2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_attention", "contributes_nothing"])
@pytest.mark.parametrize("kind", PREDICT_MASKS)
@pytest.mark.parametrize("sizes", [(300, 200, 16, 4, 2, 64, 18, 6), (40, 70, 5, 2, 3, 12, 7, 11)],
                         ids=["table2-avx2", "odd-portable"])
def test_fused_predict_kernel_matches_the_two_poolings(monkeypatch, sizes, kind, uniform, threads):
    """Inference's one kernel (only the points some row keeps, the de-selected ones as one shared row, eq. 18
    over the rows in cache) against eq. 14-17 and then eq. 18 on the torch path: every reading of z, with the
    exp tables (binary z) and without (soft z), on 1 and 2 threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused, reference = _fused_and_reference(monkeypatch, sizes, kind, uniform)
    finally:
        torch.set_num_threads(previous)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    if kind == "none-kept" and not uniform:  # every row weighs 0: an empty message, as weighted_softmax gives
        assert (fused == 0).all()


def test_fused_predict_takes_every_exp_where_the_exp_table_would_underflow(monkeypatch):
    """Scores spanning more than MAX_EXP_RANGE within a column: no exp table, the per-sample exps, same result."""
    fused, reference = _fused_and_reference(monkeypatch, (300, 100, 16, 2, 2, 64, 18, 6), "binary", True,
                                            score_scale=40.0)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_fused_predict_keeps_a_nan_where_the_reference_has_it(monkeypatch):
    """A NaN selector logit (e.g. from broken weights) must reach that sample's output, as on the reference path,
    not vanish with a dropped point; the other samples are unaffected."""
    sizes = (300, 64, 16, 2, 2, 64, 18, 6)
    u, b, s, layers, heads, k, d, q = sizes
    rows, index, factor, _, combined, bias, queries, norm_weight, norm_bias = (
        t.detach() for t in _gathered_inputs(u, b, s, layers, heads, k, d))
    logits = _predict_logits("binary", layers, b, k, torch.Generator().manual_seed(7))
    logits[5, 0, 1] = float("nan")  # in a column no other row keeps
    pattern_factor = torch.randn(layers, d, q)
    with torch.no_grad():
        fused = fused_predict(native_library(rows), rows, index, factor, logits, GAMMA, combined, bias, queries,
                              norm_weight, norm_bias, heads, 1e-5, pattern_factor, True).view(layers, b, q, d)
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        shared = gathered_pool_norm(rows, index, factor, dynamic_activation(logits, GAMMA), combined, bias, queries,
                                    norm_weight, norm_bias, heads, 1e-5)
        reference = row_attention_pool(shared, pattern_factor).view(layers, b, q, d)
    assert torch.isnan(fused[0, 5]).all() and torch.isnan(reference[0, 5]).all()
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert torch.isfinite(fused[:, :5]).all() and torch.isfinite(fused[1]).all()


def test_fused_predict_checks_the_index():
    rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias = (
        t.detach() for t in _gathered_inputs(30, 20, 4, 2, 2, 8, 6))
    index[3, 1] = 30
    with pytest.raises(IndexError, match="out of range"):
        fused_predict(native_library(rows), rows, index, factor, torch.zeros(20, 2, 8), GAMMA, combined, bias, queries,
                      norm_weight, norm_bias, 2, 1e-5, torch.randn(2, 6, 4), True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sizes", [(4, 300, 3, 18), (1, 70, 2, 6)], ids=["table2-avx2", "odd-portable"])
def test_pattern_chain_kernel_matches_the_torch_path(monkeypatch, sizes, threads):
    """Eq. 19's chain of LayerNorms (PatternSelector.chain) through the C chain and through torch: T^L and the
    gradients of the parts and of the norms' weights and biases, and the inference branch."""
    layers, b, tasks, d = sizes
    gen = torch.Generator().manual_seed(4)
    selector = PatternSelector(layers, tasks, d, 2)
    with torch.no_grad():
        selector.norm.weight.add_(0.3 * torch.randn(layers, d, generator=gen))
        selector.norm.bias.add_(0.3 * torch.randn(layers, d, generator=gen))
    parts = (torch.randn(layers, b, tasks, d, generator=gen) * 2).requires_grad_()
    inputs = [parts, selector.norm.weight, selector.norm.bias]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # T^L transposed, so that the gradient reaching the chain's backward is not contiguous (as from the towers)
        fast, reference = _both_paths(monkeypatch, lambda: _outputs_and_gradients(
            lambda: selector.chain(parts).transpose(0, 1), inputs))
        monkeypatch.setenv(native.DISABLE_ENV, "1")
        with torch.no_grad():  # the inference branch takes the kernel too
            no_grad = selector.chain(parts).transpose(0, 1)
    finally:
        torch.set_num_threads(previous)
    _assert_close(fast, reference)
    torch.testing.assert_close(no_grad, reference[0][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sizes", [(4, 300, 3, 18, 2), (1, 70, 2, 6, 2), (2, 37, 3, 20, 4), (3, 9, 1, 5, 1)],
                         ids=["table2-avx2", "one-layer", "overlapping-column-blocks", "odd-portable"])
def test_from_pooled_kernel_matches_the_torch_path(monkeypatch, sizes, threads):
    """Inference's PatternSelector.from_pooled, eq. 16's W^V W^O per task and eq. 19's chain in one C pass
    (pattern_chain_pooled), against torch's product and chain: over row blocks full and partial, at widths that the
    blocks of 6 columns divide and do not, and below them (the portable loops)."""
    layers, b, tasks, d, heads = sizes
    gen = torch.Generator().manual_seed(7)
    selector = PatternSelector(layers, tasks, d, heads)
    with torch.no_grad():
        for parameter in selector.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=gen))
    pooled = torch.randn(layers * b, tasks * heads, d, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            fast, reference = _both_paths(monkeypatch, lambda: selector.from_pooled(pooled))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert fast.shape == (b, tasks, d)


def test_every_layers_value_table_in_one_product_is_each_layers_table():
    """value_table over the stacked layers (what the kernels' paths take once per batch) gives each layer's table,
    bias / M included, exactly as that layer alone."""
    gen = torch.Generator().manual_seed(8)
    rows, combined, bias = (torch.randn(37, 18, generator=gen), torch.randn(4, 18, 36, generator=gen),
                            torch.randn(4, 1, 18, generator=gen))
    stacked = value_table(rows, combined, bias, 2)
    assert stacked.shape == (4, 37, 36)
    for layer in range(4):
        alone = value_table(rows, combined[layer], bias[layer], 2)
        assert torch.equal(stacked[layer], alone)
        torch.testing.assert_close(alone, rows @ combined[layer] + bias[layer].repeat(1, 2) / 2)


def test_portable_build_matches_the_avx2_build(monkeypatch):
    """APEM_GENERIC_KERNEL builds the loops a CPU without AVX2 runs; both builds agree at Table 2's sizes."""
    generic = native.load_kernels(defines=("APEM_GENERIC_KERNEL",))
    assert generic is not None
    builds = [native_library(torch.zeros(1)), typed_library(generic)]
    assert builds[0]._name != builds[1]._name  # two libraries, two cache entries
    inputs = _gathered_inputs(300, 150, 16, 2, 2, 64, 18)
    params = [t for t in inputs if t.requires_grad]
    gen = torch.Generator().manual_seed(3)
    shared, factor = torch.randn(2, 150, 64, 18, generator=gen), torch.randn(2, 18, 6, generator=gen)
    row_weights = (torch.rand(2, 150, 64, generator=gen) > 0.4).float()
    grad_pooled = torch.randn(2, 150, 6, 18, generator=gen)
    results = []
    for lib in builds:
        pool = _outputs_and_gradients(lambda: NativeGatheredPoolNorm.apply(lib, *inputs, 2, 1e-5), params)
        pooled, weights, q = row_pool_forward(lib, factor, row_weights, shared)
        results.append([*pool[0], *pool[1], pooled, weights, q,
                        *row_pool_backward(lib, factor, weights, q, shared, grad_pooled)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)
    fused = [_fused_and_reference(monkeypatch, (300, 150, 16, 2, 2, 64, 18, 6), "binary-and-fractional",
                                  True, lib=lib)[0] for lib in builds]
    torch.testing.assert_close(fused[0], fused[1], atol=1e-5, rtol=1e-5)
    chain_inputs = (torch.randn(2, 150, 3, 36, generator=gen), torch.randn(2, 36, 18, generator=gen) / 6,
                    torch.randn(2, 1, 18, generator=gen), 1 + torch.randn(2, 18, generator=gen) / 4,
                    torch.randn(2, 18, generator=gen))
    chains = [pattern_chain_pooled(lib, *chain_inputs, 1e-5) for lib in builds]
    torch.testing.assert_close(chains[0], chains[1], atol=1e-5, rtol=1e-5)


def _rows_away_from_relu_kinks(model, x: torch.Tensor, y: torch.Tensor, margin: float = 1e-5):
    """The rows whose tower pre-activations all sit farther than ``margin`` from the ReLU's kink at 0.

    A pre-activation within float rounding of 0 (one of 600 rows measured 2e-8) takes either side of the kink
    depending on the order of a kernel's sums, which the compiler picks per CPU (AVX2 or AVX-512 builds), and
    flips that row's whole gradient: a comparison at 1e-5 would then test the kink, not the kernels."""
    pre_activations = []  # the towers' activation module sees each hidden layer's (N, B, hidden) input
    hook = model.towers.activation.register_forward_hook(
        lambda module, inputs, output: pre_activations.append(inputs[0]))
    with torch.no_grad():
        model.eval()(x)
    hook.remove()
    near = torch.zeros(x.shape[0], dtype=torch.bool)
    for h in pre_activations:
        near |= (h.abs() < margin).any(dim=2).any(dim=0)
    assert pre_activations and int(near.sum()) < 0.05 * x.shape[0]  # a handful of rows, not the batch
    return x[~near], y[~near]


def test_trained_apem_predicts_and_learns_the_same_through_the_kernels(monkeypatch, tmp_path):
    """A trained APEM at Table 2's sizes: probabilities and every parameter's gradient agree to 1e-5
    with and without the kernels."""
    write_synthetic_dataset(SynthConfig(rows=3000, days=10, seed=0), str(tmp_path / "d"))
    ds = read_dataset(str(tmp_path / "d"))
    enc = FeatureEncoder(ds.spec).fit(ds)
    data = encode_dataset(ds, enc)
    torch.manual_seed(0)
    model = build_model("apem", enc.fields, data.y.shape[1])
    fit(model, data, None, TrainConfig(epochs=1, batch_size=512, seed=0, device="cpu", progress=False))
    x, y = _rows_away_from_relu_kinks(model, data.x[:700], data.y[:700])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        probs = model(x).probs
        return [probs.detach()], torch.autograd.grad(torch.nn.functional.binary_cross_entropy(probs, y), params)

    fast, reference = _both_paths(monkeypatch, step)
    _assert_close(fast, reference)
    model.eval()
    with torch.no_grad():
        predictions = _both_paths(monkeypatch, lambda: model(x).probs)
    torch.testing.assert_close(predictions[0], predictions[1], atol=1e-5, rtol=0)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library, restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    native._load.cache_clear()
    yield tmp_path / "cache"
    native._load.cache_clear()


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"], ids=["missing", "failing"])
def test_without_a_working_compiler_the_torch_path_runs(monkeypatch, fresh_build, compiler, caplog):
    monkeypatch.setenv("CC", compiler)
    inputs = _gathered_inputs(30, 20, 4, 2, 2, 8, 6)
    assert native.load_kernels() is None and native_library(inputs[0]) is None
    out = gathered_pool_norm(*inputs, 2, 1e-5)  # the torch path
    assert out.shape == (2, 20, 8, 6) and torch.isfinite(out).all()
    assert "torch path runs instead" in caplog.text
    assert not any(p.is_file() for p in fresh_build.rglob("*"))  # a failed build leaves nothing behind


def test_a_build_writes_only_its_own_library_into_the_cache(fresh_build):
    fresh_build.mkdir(parents=True)
    (fresh_build / "users-file.txt").write_text("kept")
    lib = native.load_kernels()
    assert lib is not None
    assert sorted(p.name for p in fresh_build.iterdir()) == sorted(["users-file.txt", os.path.basename(lib._name)])
    assert (fresh_build / "users-file.txt").read_text() == "kept"


def test_an_index_outside_the_rows_raises_instead_of_reading_past_them():
    rows, index, *rest = _gathered_inputs(30, 20, 4, 2, 2, 8, 6)
    for bad in (30, -1):
        index[3, 1] = bad
        with pytest.raises(IndexError, match="out of range"):
            gathered_pool_norm(rows, index, *rest, 2, 1e-5)


def test_an_int32_index_gives_what_an_int64_index_gives_forward_and_backward():
    rows, index, *rest = inputs = _gathered_inputs(50, 70, 6, 2, 2, 16, 6)
    params = [t for t in inputs if t.requires_grad]
    results = [_outputs_and_gradients(lambda i=i: gathered_pool_norm(rows, i, *rest, 2, 1e-5), params)
               for i in (index, index.to(torch.int32))]
    _assert_close(*results)


def test_disabled_kernels_are_not_loaded(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.load_kernels() is None and native_library(torch.zeros(1)) is None


def test_only_float32_cpu_tensors_take_the_kernels():
    assert native_library(torch.zeros(1)) is not None
    assert native_library(torch.zeros(1, dtype=torch.float64)) is None
    assert native_library(torch.zeros(1), None) is not None


def test_native_kernels_share_torchs_openmp_runtime():
    """The kernels' OpenMP runtime is the one torch's ops run on (their libgomp.so.1 resolves to torch's), so
    their threads are torch's own. If a torch build ships its OpenMP runtime under another name, this fails:
    the kernels still compute the same, but their threads and torch's would then compete for the cores.
    (Other packages may load their own renamed copies, e.g. scikit-learn's; those do not matter here.)"""
    lib = native_library(torch.zeros(1))
    assert lib is not None
    torchs = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
    address = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value  # resolved through the kernels' dependencies
    assert address == ctypes.cast(torchs.GOMP_parallel, ctypes.c_void_p).value


def test_kernels_are_right_when_openmp_gives_fewer_threads_than_asked():
    """Under OMP_THREAD_LIMIT=1 every team has one thread while the kernels ask for two (torch's thread count):
    the rows are split over the threads the runtime gave, and a gradient slot no thread wrote adds nothing. The
    2-thread kernel tests of this file, rerun in a process with that limit."""
    selected = "matches_the_torch_path and table2-avx2 and 2]"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
                            env={**os.environ, "OMP_THREAD_LIMIT": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("11 passed"), result.stdout[-3000:]


def test_a_compiled_model_takes_the_torch_path_and_matches_the_kernels(monkeypatch):
    """Under torch.compile the kernels stay out (their raw pointers would point into tensors a compiled graph
    does not keep alive): dynamo traces the torch path, which gives what the kernels give, gradients too.
    backend="eager" runs dynamo's tracing without inductor's code generation (seconds, not a minute)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 18, generator=gen)
    assert native_library(x) is not None  # eager: the kernels
    assert torch.compile(lambda t: t * 2 if native_library(t) is None else t * 3, backend="eager")(x).equal(x * 2)
    fields = [FieldSpec("a", 7), FieldSpec("b", 5), FieldSpec("c", 11), FieldSpec("d", 3)]
    torch.manual_seed(0)
    model = build_model("apem", fields, 3).train()
    batch = torch.stack([torch.randint(0, f.cardinality, (64,), generator=gen) for f in fields], dim=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(forward):
        probs = forward(batch).probs
        return [probs.detach()], torch.autograd.grad(probs.square().sum(), params)

    _assert_close(step(torch.compile(model.forward, backend="eager")), step(model.forward))
