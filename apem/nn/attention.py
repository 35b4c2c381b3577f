"""Attention of APEM (paper eq. 14-19): inducing-point attention (ASRG, eq. 14-17), the Pattern
Selector (eq. 18-19), and plain multi-head self-attention for the "w/o ASRG" ablation."""

from __future__ import annotations

import functools

import torch
from torch import nn

from apem.nn.layers import StackedLayerNorm, layer_norm
from apem.nn.native_pools import (NativeGatheredPoolNorm, fused_predict, gathered_pool_norm_forward, native_library,
                                  native_dynamic_activation, pattern_chain, pattern_chain_pooled, pattern_pool,
                                  row_pool_backward, row_pool_forward, value_table)
from apem.nn.selection import kept_by_batch


def float32_outside_autocast(fn):
    """Run ``fn`` (a pooling with a hand-written autograd) in float32 with autocast off.

    The hand-written forwards and backwards reuse buffers in place and mix saved tensors, which
    must share one dtype; under bf16 autocast (``TrainConfig.precision="bf16"``) their matmuls
    would return bf16 beside float32 masks. Floating-point tensor arguments are cast to float32
    and the region runs without autocast, so the rest of the model keeps its bf16 matmuls.
    """
    @functools.wraps(fn)
    def wrapper(*args):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device_type):
            return fn(*args)
        with torch.autocast(device_type, enabled=False):
            return fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
    return wrapper


def multihead_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention (eq. 15) with ``heads`` heads, concatenated (eq. 16 before W^O).

    queries (B, Q, d), keys and values (B, S, d) -> (B, Q, d). Heads are folded into the batch so
    the work is two ``bmm`` calls.
    """
    b, q_len, d = queries.shape
    s_len = keys.shape[1]
    h = d // heads

    def split(t: torch.Tensor, length: int) -> torch.Tensor:
        return t.reshape(b, length, heads, h).transpose(1, 2).reshape(b * heads, length, h)

    scores = torch.bmm(split(queries, q_len) * h ** -0.5, split(keys, s_len).transpose(1, 2))
    out = torch.bmm(torch.softmax(scores, dim=-1), split(values, s_len))
    return out.reshape(b, heads, q_len, h).transpose(1, 2).reshape(b, q_len, d)


def softmax_over_sources_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of (B, S, P) scores, in place (public ops only): no second (B, S, P) buffer."""
    scores.sub_(scores.amax(dim=1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=1, keepdim=True))


class _MaskedSoftmaxPool(torch.autograd.Function):
    """Autograd for :func:`masked_softmax_pool` with a hand-written backward.

    The (B, S, P) score tensor (8192 floats per row at Table 2's sizes) dominates APEM's cost, so
    forward keeps only two copies (raw scores, softmax weights) and backward reuses its own buffers
    in place: one big GEMM per factor instead of autograd's chain of elementwise temporaries.
    """

    @staticmethod
    def forward(ctx, source, factor, mask, columns):
        b, s, d = source.shape
        raw = (source.reshape(b * s, d) @ factor).view(b, s, -1)
        weights = (raw.view(b, s, *columns) * mask).view(b, s, -1)
        ctx.columns = columns
        softmax_over_sources_(weights)
        ctx.save_for_backward(source, factor, mask, raw if ctx.needs_input_grad[2] else None, weights)
        return torch.bmm(weights.transpose(1, 2), source)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled):
        source, factor, mask, raw, weights = ctx.saved_tensors
        b, s, d = source.shape
        grad_pooled = grad_pooled.contiguous()
        grad_source = torch.bmm(weights, grad_pooled)  # through the pooling
        grad_scores = torch.bmm(source, grad_pooled.transpose(1, 2))  # d/d weights, (B, S, P)
        # softmax backward in place: w (g - sum_s w g) = w g - w * sum_s(w g)
        grad_scores.mul_(weights)
        grad_scores.addcmul_(weights, grad_scores.sum(dim=1, keepdim=True), value=-1.0)
        grad_mask = None
        if ctx.needs_input_grad[2]:  # d/d mask = sum over fields of grad_scores * raw; raw is not needed again
            # reduce the field axis first (a contiguous slab sum), then any broadcast axes of the mask
            grad_mask = raw.mul_(grad_scores).view(b, s, *ctx.columns).sum(dim=1, keepdim=True).sum_to_size(mask.shape)
        grad_raw = grad_scores.view(b, s, *ctx.columns).mul_(mask).view(b * s, -1)
        grad_source = grad_source.view(b * s, d).addmm_(grad_raw, factor.t()).view(b, s, d)
        grad_factor = source.reshape(b * s, d).t() @ grad_raw if ctx.needs_input_grad[1] else None
        return grad_source, grad_factor, grad_mask, None


@float32_outside_autocast
def masked_softmax_pool(source: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor,
                        columns: tuple[int, ...]) -> torch.Tensor:
    """Eq. 14-15's attention pooling with factored scores: softmax over the S source rows of
    mask * (S_b factor), then the weighted sum of source rows.

    source (B, S, d), factor (d, P) (the query-side factor, already scaled), ``columns`` a split of
    P, and mask broadcastable against the scores viewed as (B, S, *columns) (a query whose mask
    is 0 gets uniform weights) -> pooled (B, P, d).
    """
    if torch.is_grad_enabled() and (source.requires_grad or factor.requires_grad or mask.requires_grad):
        return _MaskedSoftmaxPool.apply(source, factor, mask, tuple(columns))
    b, s, d = source.shape
    scores = (source.reshape(b * s, d) @ factor).view(b, s, *columns)
    scores = scores.mul_(mask).view(b, s, -1)
    if torch.jit.is_tracing():
        scores = torch.softmax(scores, dim=1)
    else:  # in place: inference keeps a single (B, S, P) buffer
        softmax_over_sources_(scores)
    return torch.bmm(scores.transpose(1, 2), source)


def _softmax_backward_(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Softmax backward over dim 1, in place on ``grad``: w (g - sum_s w g) = w g - w * sum_s(w g)."""
    grad.mul_(weights)
    return grad.addcmul_(weights, grad.sum(dim=1, keepdim=True), value=-1.0)


def _scatter_rows(grad: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum the (N, C) rows of ``grad`` into (n_rows, C) by ``index`` (N,): a gather's backward.
    ``scatter_add_`` measured ~3x faster than ``index_add_`` (a tensor op per row on CPU) here."""
    return grad.new_zeros(n_rows, grad.shape[1]).scatter_add_(0, index.view(-1, 1).expand_as(grad), grad)


def _gathered_pool_layer(rows, index, factor, mask, combined, bias, queries, heads, out):
    """One layer of :func:`gathered_pool`: writes its output O + Q_hat (B, K, d_v) into ``out``, returns the
    softmax weights (B, S, M K)."""
    b, s = index.shape
    k, m = mask.shape[1], heads
    dv = combined.shape[1] // m
    flat_index = index.view(-1)
    table = value_table(rows, combined, bias, m)
    raw = (rows @ factor).index_select(0, flat_index).view(b, s, m, k)
    weights = softmax_over_sources_(torch.mul(raw, mask.view(b, 1, 1, k)).view(b, s, m * k))
    values = table.index_select(0, flat_index).view(b, s * m, dv)
    torch.bmm(weights.view(b, s * m, k).transpose(1, 2), values, out=out)
    out.addcmul_(queries, mask.unsqueeze(-1))  # eq. 17's residual Q_hat = I (.) z_K, while out is in cache
    return weights


class _GatheredPool(torch.autograd.Function):
    """Autograd for :func:`gathered_pool`: per layer the saved softmax weights; the score and value
    rows are re-gathered from the small (U, .) tables in backward, whose gradients are summed
    back per distinct row (one scatter) before the (U x d) GEMMs."""

    @staticmethod
    def forward(ctx, rows, index, factor, mask, combined, bias, queries, heads):
        outs = _gathered_pool_outputs(rows, index, factor, mask, combined, heads)
        weights = [_gathered_pool_layer(rows, index, factor[layer], mask[:, layer], combined[layer], bias[layer],
                                        queries[layer], heads, outs[layer]) for layer in range(factor.shape[0])]
        ctx.heads = heads
        ctx.save_for_backward(rows, index, factor, mask, combined, queries, *weights)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        rows, index, factor, mask, combined, queries, *weights = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows)
        grad_factor, grad_combined = torch.empty_like(factor), torch.empty_like(combined)
        grad_queries, grad_mask = torch.empty_like(queries), torch.empty_like(mask)
        grad_bias = rows.new_empty(factor.shape[0], 1, queries.shape[2])
        for layer, grad_out in enumerate(grad_outs):  # unused outputs get zeros (materialised grads)
            grad_out = grad_out.contiguous()
            grad_scores, grad_values = _gathered_pool_layer_backward(
                rows, index, factor[layer], mask[:, layer], combined[layer], weights[layer], grad_out,
                ctx.heads, grad_mask[:, layer])
            grad_rows.addmm_(grad_scores, factor[layer].t()).addmm_(grad_values, combined[layer].t())
            torch.mm(rows.t(), grad_scores, out=grad_factor[layer])
            torch.mm(rows.t(), grad_values, out=grad_combined[layer])
            _residual_backward(grad_out, mask[:, layer], queries[layer], grad_mask[:, layer], grad_queries[layer])
            torch.sum(grad_out, dim=(0, 1), out=grad_bias[layer, 0])
        return grad_rows, None, grad_factor, grad_mask, grad_combined, grad_bias, grad_queries, None


def _gathered_pool_outputs(rows, index, factor, mask, combined, heads) -> tuple[torch.Tensor, ...]:
    """The L' empty (B, K, d_v) outputs of :func:`gathered_pool`."""
    n, b, k = factor.shape[0], index.shape[0], mask.shape[2]
    return tuple(rows.new_empty(b, k, combined.shape[2] // heads) for _ in range(n))


def _residual_backward(grad_out, mask, queries, grad_mask, grad_queries):
    """Q_hat = I (.) z_K's gradients for one layer while grad_out (B, K, d) is in cache: adds
    sum_d grad_out I into grad_mask (B, K) and writes sum_b z grad_out into grad_queries (K, d).
    (K-batched bmm forms of the two sums measured several times slower.)"""
    grad_mask.add_(torch.mul(grad_out, queries).sum(-1))
    torch.sum(torch.mul(grad_out, mask.unsqueeze(-1)), dim=0, out=grad_queries)


def _gathered_pool_layer_backward(rows, index, factor, mask, combined, weights, grad_out, heads, grad_mask):
    """One layer's backward: the gradients of its (U, M K) score table and (U, M d_v) value table;
    writes the mask's gradient through the scores (B, K) into ``grad_mask``."""
    b, s = index.shape
    k, m = mask.shape[1], heads
    dv = combined.shape[1] // m
    flat_index = index.view(-1)
    values = (rows @ combined).index_select(0, flat_index).view(b, s * m, dv)  # the bias does not matter here
    grad_values = torch.bmm(weights.view(b, s * m, k), grad_out).view(b * s, m * dv)  # through the pooling
    grad_scores = _softmax_backward_(torch.bmm(values, grad_out.transpose(1, 2)).view(b, s, m * k), weights)
    # d/d mask = sum over fields and heads of grad_scores * raw scores
    raw = (rows @ factor).index_select(0, flat_index).view(b, s * m, k)
    torch.sum(raw.mul_(grad_scores.view(b, s * m, k)), dim=1, out=grad_mask)
    grad_scores = grad_scores.view(b, s, m, k).mul_(mask.view(b, 1, 1, k)).view(b * s, m * k)
    n_rows = rows.shape[0]
    return _scatter_rows(grad_scores, flat_index, n_rows), _scatter_rows(grad_values, flat_index, n_rows)


@float32_outside_autocast
def gathered_pool(rows: torch.Tensor, index: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor,
                  combined: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor, heads: int
                  ) -> tuple[torch.Tensor, ...]:
    """Eq. 15-16 for L' layers of learnt queries, with the value and output projections folded in, over
    sources that are rows of a small table (source = rows[index]), plus eq. 17's residual: per layer
    O + Q_hat with Q_hat = queries (.) mask (eq. 14).

    Per layer l, sample b and query k: O[l, b, k] = bias_l + sum_{m, s} A[b, s, m, k] (S_b[s] C_{l, m}), with
    A = softmax over the S source rows of mask[b, l, k] * (S_b factor_l)[:, m, k] and C_{l, m} = W^V_m W^O_m:
    pooling the d-wide value rows S_b C_{l, m} directly drops the product of the pooled heads with
    the stacked W^V W^O blocks. APEM's sources are embedding rows, and a batch of B S fields uses far
    fewer distinct rows U (about 1k of 16k at batch 1024 on the synthetic funnel), so the score and
    value products are taken once per distinct row ((U, M K) and (U, M d_v) tables) and gathered, and
    their gradients are summed per row before the GEMMs. The work left per sample is the softmax and
    the pooling.

    rows (U, d), index (B, S) long into rows, factor (L', d, M K) with columns (head, query), mask
    (B, L', K) contiguous, combined (L', d, M d_v) with column blocks C_{l, m}, bias (L', 1, d_v),
    queries (L', K, d_v) (the inducing points) -> a tuple of L' tensors (B, K, d_v), one per layer (so
    that each layer's LayerNorm runs on its own contiguous tensor).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, factor, mask, combined, bias, queries)):
        return _GatheredPool.apply(rows, index, factor, mask, combined, bias, queries, heads)
    outs = _gathered_pool_outputs(rows, index, factor, mask, combined, heads)
    for layer, out in enumerate(outs):
        _gathered_pool_layer(rows, index, factor[layer], mask[:, layer], combined[layer], bias[layer],
                             queries[layer], heads, out)
    return outs


@float32_outside_autocast
def gathered_pool_norm(rows: torch.Tensor, index: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor,
                       combined: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """:func:`gathered_pool` and then eq. 17's LayerNorm of each layer (affine ``norm_weight``, ``norm_bias``
    (L', d_v)), stacked: Y (L', B, K, d_v). On float32 CPU tensors it runs through the C kernel
    (:class:`apem.nn.native_pools.NativeGatheredPoolNorm`), which keeps each row's softmax weights and
    LayerNorm in cache; elsewhere (CUDA, float64, no C compiler, ``APEM_NATIVE_KERNELS=0``) through
    :func:`gathered_pool` and ``layer_norm``, the reference the kernel is tested against."""
    inputs = (rows, index, factor, mask, combined, bias, queries, norm_weight, norm_bias)
    native = native_library(rows, factor, mask, combined, bias, queries, norm_weight, norm_bias)
    if native is not None and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return NativeGatheredPoolNorm.apply(native, *inputs, heads, eps)
    if native is not None:
        return gathered_pool_norm_forward(native, *inputs, heads, eps)[0]
    outs = gathered_pool(rows, index, factor, mask, combined, bias, queries, heads)
    return torch.stack([layer_norm(out, w, b, eps) for out, w, b in zip(outs, norm_weight, norm_bias)])


def weighted_softmax(scores: torch.Tensor, row_weights: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax over ``dim`` with a prior weight per entry: w_r = z_r e^{s_r} / sum_j z_j e^{s_j}.

    z_r = 0 removes row r from the attention exactly (weight 0, no gradient through its score);
    a soft z in (0, 1) lowers its share smoothly, so the selector still learns while gamma anneals.
    When every z is 0 all weights are 0 (the pooled message is empty), not NaN.
    """
    e = torch.exp(scores - scores.amax(dim=dim, keepdim=True)) * row_weights
    return e / e.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def _row_attention_pool_forward(shared, factor, row_weights):
    """The forward of :func:`row_attention_pool`: pooled (L' B, Q, d), the weights (L', Q, B, R) and, with
    row weights, q = e / sum_r(z e) (so that weights = q z), else None."""
    n, b, r, d = shared.shape
    queries = factor.shape[2]
    native = native_library(shared, factor, row_weights)
    if native is not None:  # per sample in C (apem.nn.native_pools): the scores, softmax and pooling
        pooled, weights, q = row_pool_forward(native, factor, row_weights, shared)
        return pooled.view(n * b, queries, d), weights, q
    scores = torch.bmm(factor.transpose(1, 2), shared.view(n, b * r, d).transpose(1, 2)).view(n, queries, b, r)
    q = scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # in place: measured faster than torch.softmax here
    if row_weights is None:
        weights, q = q.div_(q.sum(-1, keepdim=True)), None
    else:  # weighted_softmax's reading: all-zero row weights give all-zero weights
        z = row_weights.unsqueeze(1)
        weights = q.div_(torch.mul(q, z).sum(-1, keepdim=True).clamp_min_(torch.finfo(q.dtype).tiny)) * z
    pooled = shared.new_empty(n, b, queries, d)
    for layer in range(n):  # (B, Q, R) x (B, R, d)
        torch.bmm(weights[layer].transpose(0, 1), shared[layer], out=pooled[layer])
    return pooled.view(n * b, queries, d), weights, q


class _RowAttentionPool(torch.autograd.Function):
    """Autograd for :func:`row_attention_pool`. Scores are laid out (L', Q, B, R), so the softmax runs
    over contiguous rows; the pooling and its backward run layer by layer as B-batched products,
    and the two gradients of the rows (through the scores and through the pooling) are accumulated
    in one buffer instead of autograd's sum of two. Measured ~1.5x (plain) to ~2x (row weights)
    faster than the autograd formulation at batch 1024, K = 64 (one thread)."""

    @staticmethod
    def forward(ctx, shared, factor, row_weights):
        pooled, weights, q = _row_attention_pool_forward(shared, factor, row_weights)
        ctx.save_for_backward(shared, factor, weights, q)
        return pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        shared, factor, weights, q = ctx.saved_tensors
        n, b, r, d = shared.shape
        queries = factor.shape[2]
        grad = grad.contiguous().view(n, b, queries, d)
        native = native_library(shared, factor, weights)
        if native is not None:  # per-sample products in C, the factor's gradient included
            grad_shared, grad_factor, grad_rw = row_pool_backward(native, factor, weights, q, shared, grad)
            return grad_shared, grad_factor, grad_rw if ctx.needs_input_grad[2] else None
        grad_shared, grad_factor = torch.empty_like(shared), torch.empty_like(factor)
        grad_rw = shared.new_empty(n, b, r) if q is not None and ctx.needs_input_grad[2] else None
        for layer in range(n):
            w = weights[layer].transpose(0, 1)  # (B, Q, R)
            torch.bmm(w.transpose(1, 2), grad[layer], out=grad_shared[layer])  # through the pooling
            t = torch.bmm(grad[layer], shared[layer].transpose(1, 2))  # d/d weights, (B, Q, R)
            t.sub_(torch.mul(t, w).sum(-1, keepdim=True))  # softmax backward: w (g - sum_r w g) = w t
            if grad_rw is not None:  # weights = q z: d/dz_r = q_r t_r, summed over the queries
                torch.sum(t * q[layer].transpose(0, 1), dim=1, out=grad_rw[layer])
            grad_scores = t.mul_(w)
            grad_shared[layer].baddbmm_(grad_scores.transpose(1, 2), factor[layer].t().expand(b, queries, d))
            grad_factor[layer] = torch.bmm(grad_scores, shared[layer]).sum(0).t()
        return grad_shared, grad_factor, grad_rw


@float32_outside_autocast
def row_attention_pool(shared: torch.Tensor, factor: torch.Tensor,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 18's attention of Q learnt queries over the R rows of each sample, for L' stacked layers:
    scores (L', B, R, Q) = shared factor, softmax over R (:func:`weighted_softmax` with ``row_weights``),
    then the weighted sum of the rows.

    shared (L', B, R, d), factor (L', d, Q) (the scaled query-side factor), row_weights (L', B, R) or
    None -> pooled (L' B, Q, d).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (shared, factor, row_weights)):
        return _RowAttentionPool.apply(shared.contiguous(), factor, row_weights)
    return _row_attention_pool_forward(shared.contiguous(), factor, row_weights)[0]


def _stacked_weight(n_layers: int, in_dim: int, out_dim: int) -> nn.Parameter:
    w = torch.empty(n_layers, in_dim, out_dim)
    nn.init.uniform_(w, -in_dim ** -0.5, in_dim ** -0.5)
    return nn.Parameter(w)


class FactoredAttention(nn.Module):
    """The attention weights shared by the inducing-point (eq. 15-16) and task-indicator (eq. 18) attentions.

    Both attend from a *learnt* query (inducing points or task indicators) over a per-sample source S.
    Because the query is a parameter, the products are re-associated so the work is a few large
    matmuls instead of many tiny per-head ones:

    - scores_m = Q_m (S W^K_m)^T = S (W^K_m Q_m^T): the (d x queries) factor is computed once per batch;
    - concat_m(A_m S W^V_m) W^O = sum_m (A_m S)(W^V_m W^O_m): attention-pool S first, then one (M d x d) matmul.

    W^K has no bias: a key bias adds the same value to every score of a query and cancels in the
    softmax. W^V's bias passes through (attention weights sum to 1) and is folded into W^O's bias.
    """

    def __init__(self, n_layers: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.dim, self.head_dim = heads, dim, dim // heads
        self.w_key = _stacked_weight(n_layers, dim, dim)
        self.w_value = _stacked_weight(n_layers, dim, dim)
        self.b_value = nn.Parameter(torch.zeros(n_layers, dim))
        self.w_out = _stacked_weight(n_layers, dim, dim)
        self.b_out = nn.Parameter(torch.zeros(n_layers, 1, dim))

    # The products below are over the head dimension (d / M = 9 at Table 2's sizes) of a few (d x d) weights, once
    # per step: as broadcast products summed over it they take a few small ops; as einsum or bmm, CPU torch ran them
    # one (d x h) matrix at a time (APEM's three per step, forward and backward: 1.8 ms against 1.0 ms this way).

    def score_factor(self, queries: torch.Tensor, layers: slice) -> torch.Tensor:
        """(L', d, Q, M): W^K_m Q_m^T per layer and head, scaled by 1/sqrt(d_head) (a view of (L', d, M, Q))."""
        n, d, m, h = queries.shape[0], self.dim, self.heads, self.head_dim
        keys = self.w_key[layers].reshape(n, d, m, 1, h) * h ** -0.5
        q = queries.reshape(n, queries.shape[1], m, h).transpose(1, 2).unsqueeze(1)  # (L', 1, M, Q, h)
        return (keys * q).sum(-1).transpose(2, 3)

    def value_out(self, layers: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(L', M d, d) stacked W^V_m W^O_m blocks and the (L', 1, d) folded bias."""
        w_v, w_o = self.w_value[layers], self.w_out[layers]
        n, d, m, h = w_v.shape[0], self.dim, self.heads, self.head_dim
        values = w_v.reshape(n, d, m, h).transpose(1, 2).unsqueeze(-1)  # (L', M, d, h, 1)
        combined = (values * w_o.reshape(n, m, 1, h, d)).sum(3)  # (L', M, d, d)
        bias = (self.b_value[layers].unsqueeze(-1) * w_o).sum(1, keepdim=True) + self.b_out[layers]
        return combined.reshape(n, m * d, d), bias


def computed_points(kept: torch.Tensor, uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For one layer whose batch keeps the points ``kept`` (K,) bool (:func:`apem.nn.selection.kept_by_batch`): the
    points to compute, (C,), and eq. 18's weight of each computed row, (C,). The P kept points come first (weight 1).
    Every dropped point outputs the same row under the uniform reading, so one of them stands for all K - P (weight
    K - P); under "contributes nothing" they weigh 0 and none is needed. Dropped points of weight 0 pad C up to a
    multiple of 8 (the kernels' vector width), or to K."""
    n_points = kept.numel()
    used, dropped = kept.nonzero().view(-1), (~kept).nonzero().view(-1)
    p = used.numel()
    if p == n_points:
        return used, torch.ones(n_points)
    c = min(n_points, -(-(p + int(uniform)) // 8) * 8)
    counts = torch.zeros(c)
    counts[:p] = 1.0
    if uniform:
        counts[p] = float(n_points - p)
    return torch.cat([used, dropped[:1].expand(c - p)]), counts


class InducingPointAttention(nn.Module):
    """ASRG's feature-interaction layer (eq. 14-17) for a stack of L layers.

    Q_hat = I (.) z_K (eq. 14); O = concat_m softmax(Q_hat_m K_m^T / sqrt(d_m)) V_m W^O with
    K = S W^K, V = S W^V (eq. 15-16); Y_ASRG = LayerNorm(Q_hat + O) (eq. 17, the Set-Transformer MAB
    reading of the paper's "LayerNorm(O, H)": the residual is the K-row query, since H has F rows).
    """

    def __init__(self, n_layers: int, n_points: int, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = FactoredAttention(n_layers, dim, heads)
        self.norm = StackedLayerNorm(n_layers, dim)
        self.inducing = nn.Parameter(torch.randn(n_layers, n_points, dim) * dim ** -0.5)
        self.n_points, self.heads = n_points, heads

    def folded_weights(self, layers: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-layer factors of :func:`gathered_pool` (and of the predict-time tables of
        :mod:`apem.models.apem_folded`): score factor W^K_m I_m^T (L', d, M K), columns (head, point);
        value-output blocks W^V_m W^O_m (L', d, M d), columns (head, out); bias (L', 1, d)."""
        n, k, m, d = self.inducing[layers].shape[0], self.n_points, self.heads, self.attention.dim
        factor = self.attention.score_factor(self.inducing[layers], layers).permute(0, 1, 3, 2).reshape(n, d, m * k)
        combined, bias = self.attention.value_out(layers)  # (L', M d, d): rows (head, in)
        return factor, combined.view(n, m, d, d).permute(0, 2, 1, 3).reshape(n, d, m * d), bias

    def residual_norm(self, out: torch.Tensor, mask: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """Eq. 17's Y = LayerNorm(Q_hat + O) with Q_hat = I (.) z_K (eq. 14) fused into one pass, (L', B, K, d)."""
        return self.norm(torch.addcmul(out, self.inducing[layers].unsqueeze(1), mask.transpose(0, 1).unsqueeze(-1)),
                         layers)

    def fused_pattern_pool(self, rows: torch.Tensor, index: torch.Tensor, logits: torch.Tensor, gamma: float,
                           pattern_factor: torch.Tensor, uniform: bool,
                           folded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                           ) -> torch.Tensor | None:
        """Inference only: this ASRG over ``rows[index]`` (as :meth:`forward` with ``index``) with z_K = f_D(``logits``)
        (B, L, K) (eq. 13 with ``gamma``), followed by eq. 18's attention with ``pattern_factor`` (L, d, Q)
        (:meth:`PatternSelector.score_factor`), in one C kernel that computes only the points some row of the
        batch keeps (:func:`apem.nn.native_pools.fused_predict`). A point with z_k = 0 attends uniformly
        (``uniform``, one shared row) or weighs 0 in eq. 18 (row weights z_K). Returns
        :func:`row_attention_pool`'s pooled (L B, Q, d), or None where the kernels do not run (then
        :meth:`forward` and :class:`PatternSelector` give the same, the reference). ``folded``: this layer's
        :meth:`folded_weights`, when the caller holds them (else they are computed here)."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(rows.device.type):
            return None
        factor, combined, bias = self.folded_weights() if folded is None else folded
        lib = native_library(rows, factor, logits, combined, bias, self.inducing, self.norm.weight, pattern_factor)
        if lib is None:
            return None
        return fused_predict(lib, rows, index, factor, logits, gamma, combined, bias, self.inducing, self.norm.weight,
                             self.norm.bias, self.heads, self.norm.eps, pattern_factor, uniform)

    def kept_pattern_pool(self, rows: torch.Tensor, index: torch.Tensor, logits: torch.Tensor, gamma: torch.Tensor,
                          pattern_factor: torch.Tensor, uniform: bool) -> torch.Tensor | None:
        """Training on CPU: :meth:`fused_pattern_pool`'s result with gradients, computing per layer only the points
        some row of the batch keeps (:func:`computed_points`; all K while gamma anneals), in one C kernel per layer
        that runs :func:`gathered_pool_norm` and then :func:`row_attention_pool` per sample
        (:func:`apem.nn.native_pools.pattern_pool`), with eq. 18's row weights (the uniform row counted once per
        dropped point, or z_K). Returns pooled (L B, Q, d), or None where the kernels do not run; then
        :meth:`forward` and :class:`PatternSelector` give the same, the reference.

        Exact, not an approximation: a point with z_k = 0 in every row outputs the row every other such point
        outputs (or weighs 0), its inducing point and score columns get zero gradient either way (z_k multiplies
        both), and f_D's derivative is exactly 0 where it is 0 (:func:`apem.nn.selection.kept_by_batch`), so its
        logit's gradient is 0 on both paths."""
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(rows.device.type):
            return None
        lib = native_library(rows, logits, self.inducing, pattern_factor)
        if lib is None:
            return None
        with torch.no_grad():
            kept = kept_by_batch(logits, gamma)  # (L, K)
        # per layer every point (while gamma anneals, every layer), or the kept ones and the dropped ones' stand-in and
        # padding (z = 0 there: a dropped point's f_D is 0 in every row); eq. 18's row weights other than z_K: the
        # count of points each row stands for (none where every point is kept: a plain softmax)
        plans = [(None, None)] * len(kept)
        for layer, row in enumerate([] if bool(kept.all()) else kept):
            if not bool(row.all()):
                columns, counts = computed_points(row, uniform)
                plans[layer] = (columns, counts if uniform else None)
        z = native_dynamic_activation(lib, logits, gamma)  # eq. 13, (B, L, K)
        factor, combined, bias = self.folded_weights()
        return pattern_pool(lib, rows, index, factor, z, combined, bias, self.inducing, self.norm.weight,
                            self.norm.bias, pattern_factor, plans, not uniform, self.heads, self.norm.eps)

    def forward(self, source: torch.Tensor, mask: torch.Tensor, layers: slice = slice(None),
                index: torch.Tensor | None = None) -> torch.Tensor:
        """source (B, S, d) attended by the layers in ``layers``; mask z_K (B, L', K) -> Y (L', B, K, d).

        All layers' scores in one GEMM (:func:`masked_softmax_pool`), then W^V W^O on the pooled heads.
        With ``index`` (B, S), the source is ``source[index]`` over a table of distinct rows (U, d),
        attended through :func:`gathered_pool_norm` (the same Y, to float rounding; on CPU its C kernel)."""
        if index is not None:
            factor, combined, bias = self.folded_weights(layers)
            return gathered_pool_norm(source, index, factor, mask.contiguous(), combined, bias, self.inducing[layers],
                                      self.norm.weight[layers], self.norm.bias[layers], self.heads, self.norm.eps)
        b, s, d = source.shape
        inducing = self.inducing[layers]
        n, k, m = inducing.shape[0], self.n_points, self.heads
        factor = self.attention.score_factor(inducing, layers)  # (L', d, K, M)
        # score columns ordered (layer, head, point): the mask then broadcasts over a contiguous K axis
        factor = factor.permute(1, 0, 3, 2).reshape(d, n * m * k)
        pooled = masked_softmax_pool(source, factor, mask.view(b, 1, n, 1, k), (n, m, k))  # (B, L' M K, d)
        pooled = pooled.view(b, n, m, k, d).permute(1, 0, 3, 2, 4).reshape(n, b * k, m * d)
        combined, bias = self.attention.value_out(layers)
        return self.residual_norm(torch.baddbmm(bias, pooled, combined).view(n, b, k, d), mask, layers)


class PatternSelector(nn.Module):
    """Explicit Pattern Selector (eq. 18-19) over a stack of shared representations.

    F_i^k = Attention(alpha_i^k, Y^k, Y^k) with eq. 15-16's multi-head attention (eq. 18), and
    T_i^k = LayerNorm(T_i^{k-1} + F_i^k) (eq. 19), with T_i^1 = LayerNorm(F_i^1) since T^0 is ignored.
    ``task_indicators=False`` (the "w/o PS" ablation) uses the task-agnostic mean of Y^k's rows as F^k.

    ``row_weights`` (L, B, R), when given, weighs each row of Y^k in the attention (and in the mean):
    APEM's "contributes nothing" reading of z_K passes z_K here, so a de-selected inducing point
    (z_k = 0) is removed from eq. 18's attention (:func:`weighted_softmax`).
    """

    def __init__(self, n_layers: int, n_tasks: int, dim: int, heads: int, task_indicators: bool = True) -> None:
        super().__init__()
        self.n_tasks, self.heads = n_tasks, heads
        self.task_indicators = task_indicators
        self.norm = StackedLayerNorm(n_layers, dim)
        if task_indicators:  # the "w/o PS" ablation has no attention parameters at all
            self.attention = FactoredAttention(n_layers, dim, heads)
            self.indicator = nn.Parameter(torch.randn(n_layers, n_tasks, dim) * dim ** -0.5)

    def score_factor(self) -> torch.Tensor:
        """Eq. 18's query-side factor (L, d, N M) of the task indicators, columns (task, head)."""
        n, d = self.indicator.shape[0], self.indicator.shape[2]
        return self.attention.score_factor(self.indicator, slice(None)).reshape(n, d, self.n_tasks * self.heads)

    def from_pooled(self, pooled: torch.Tensor,
                    value_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """T^L (B, N, d) from eq. 18's pooled rows (L B, N M, d) (:func:`row_attention_pool`): W^V W^O per task
        (eq. 16) and eq. 19's chain. ``value_out``: ``self.attention.value_out()``, when the caller holds it."""
        n, d = self.norm.weight.shape
        b = pooled.shape[0] // n
        combined, bias = self.attention.value_out(slice(None)) if value_out is None else value_out
        lib = None if torch.is_grad_enabled() else native_library(pooled, combined, bias, self.norm.weight)
        if lib is not None:  # inference on CPU: both in one C pass over the rows
            return pattern_chain_pooled(lib, pooled.view(n, b, self.n_tasks, self.heads * d), combined, bias,
                                        self.norm.weight, self.norm.bias, self.norm.eps)
        task_parts = torch.baddbmm(bias, pooled.view(n, b * self.n_tasks, self.heads * d), combined)
        return self.chain(task_parts.view(n, b, self.n_tasks, d))

    def chain(self, task_parts: torch.Tensor) -> torch.Tensor:
        """Eq. 19: T^k = LayerNorm(T^{k-1} + F^k) over the layers' F^k (L, B, N, d), T^1 = LayerNorm(F^1) -> T^L.
        On CPU it runs per sample in C, forward and backward (:func:`apem.nn.native_pools.pattern_chain`); this is
        its reference."""
        lib = native_library(task_parts, self.norm.weight, self.norm.bias)
        if lib is not None:
            return pattern_chain(lib, task_parts, self.norm.weight, self.norm.bias, self.norm.eps)
        t = self.norm(task_parts[0], 0)
        for layer in range(1, task_parts.shape[0]):
            t = self.norm(t + task_parts[layer], layer)
        return t

    def forward(self, shared: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """shared (L, B, R, d), optional row_weights (L, B, R) -> T^L (B, N, d)."""
        n, b, r, d = shared.shape
        t_count = self.n_tasks
        if self.task_indicators:
            return self.from_pooled(row_attention_pool(shared, self.score_factor(), row_weights))  # (L B, N M, d)
        if row_weights is None:
            task_parts = shared.mean(dim=2, keepdim=True).expand(n, b, t_count, d)
        else:  # the weighted mean over the selected rows (all 0 gives an empty message)
            total = row_weights.sum(dim=2, keepdim=True).clamp_min(torch.finfo(shared.dtype).tiny).unsqueeze(-1)
            task_parts = ((shared * row_weights.unsqueeze(-1)).sum(dim=2, keepdim=True) / total).expand(n, b, t_count, d)
        return self.chain(task_parts)
