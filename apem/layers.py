"""Small building blocks shared by all models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apem.models.base import FieldSpec


class FieldEmbedding(nn.Module):
    """One embedding table for all fields, addressed by per-field offsets: (B, F) -> (B, F, dim)."""

    def __init__(self, fields: Sequence[FieldSpec], dim: int) -> None:
        super().__init__()
        cards = torch.tensor([f.cardinality for f in fields], dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(cards, 0) - cards, persistent=False)
        self.embedding = nn.Embedding(int(cards.sum()), dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.n_fields = len(fields)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x + self.offsets)


class MLP(nn.Module):
    """Linear -> activation (-> dropout) per hidden size; an optional final linear to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), activation()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = size
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def dynamic_activation(z: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Eq. 13, the dynamic activation f_D (a smooth-step, as in DSelect-k):

    f_D(z) = 0 for z <= -gamma/2, 1 for z >= gamma/2, and -2 z^3 / gamma^3 + 3 z / (2 gamma) + 1/2 between.

    Computed on u = clamp(z / gamma, -1/2, 1/2) as -2 u^3 + 3/2 u + 1/2, which is exact 0 / 1 at
    the ends (so the mask really is sparse) and stays finite for gamma as small as 1e-3.
    """
    u = torch.clamp(z / gamma, -0.5, 0.5)
    return 0.5 + u * (1.5 - 2.0 * u * u)


def gamma_at(step: int, start: float = 10.0, decay: float = 1e-2, minimum: float = 1e-3) -> float:
    """The annealing of eq. 13's gamma: gamma(step) = max(start - decay * step, minimum).

    The paper prints "Max{10 - 2e*step, 1e*3}" with about 1e6 training steps; we read it as
    max(10 - 2e-5 * step, 1e-3), i.e. a linear decay from 10 that reaches the floor 1e-3 halfway
    through training. Our datasets train for thousands, not millions, of steps, so ``decay`` is a
    parameter; APEM's default (1e-2) reaches gamma = 2 after 800 steps and the floor after 1000,
    i.e. within the first epochs of a few hundred thousand rows, after which f_D is binary.
    """
    return max(start - decay * step, minimum)


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
        torch.ops.aten._softmax.out(weights, 1, False, out=weights)
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
        torch.ops.aten._softmax_backward_data.out(grad_scores, weights, 1, torch.float32, grad_input=grad_scores)
        grad_mask = None
        if ctx.needs_input_grad[2]:  # d/d mask = sum over fields of grad_scores * raw; raw is not needed again
            # reduce the field axis first (a contiguous slab sum), then any broadcast axes of the mask
            grad_mask = raw.mul_(grad_scores).view(b, s, *ctx.columns).sum(dim=1, keepdim=True).sum_to_size(mask.shape)
        grad_raw = grad_scores.view(b, s, *ctx.columns).mul_(mask).view(b * s, -1)
        grad_source = grad_source.view(b * s, d).addmm_(grad_raw, factor.t()).view(b, s, d)
        grad_factor = source.reshape(b * s, d).t() @ grad_raw if ctx.needs_input_grad[1] else None
        return grad_source, grad_factor, grad_mask, None


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
        torch.ops.aten._softmax.out(scores, 1, False, out=scores)
    return torch.bmm(scores.transpose(1, 2), source)


class StackedLayerNorm(nn.Module):
    """LayerNorm over the last dim with separate affine parameters for each of ``L`` stacked layers."""

    def __init__(self, n_layers: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_layers, dim))
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.dim = dim

    def forward(self, x: torch.Tensor, layers: slice | int) -> torch.Tensor:
        """x: (L', ..., d) for the layers selected by a slice, or (..., d) for one layer index."""
        normed = torch.nn.functional.layer_norm(x, (self.dim,))
        w, b = self.weight[layers], self.bias[layers]
        if isinstance(layers, slice):
            shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
            w, b = w.view(shape), b.view(shape)
        return torch.addcmul(b, normed, w)  # one pass for the affine part


class TaskTowers(nn.Module):
    """One MLP tower per task, run as batched matmuls: (B, N, in) -> (B, N) logits."""

    def __init__(self, n_tasks: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = torch.empty(n_tasks, fan_in, fan_out)
            nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_tasks, 1, fan_out)))
        self.activation = activation()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)  # (N, B, in): one bmm per tower layer for all tasks
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.dropout(self.activation(h))
        return h.squeeze(-1).transpose(0, 1)


def _stacked_weight(n_layers: int, in_dim: int, out_dim: int) -> nn.Parameter:
    w = torch.empty(n_layers, in_dim, out_dim)
    nn.init.uniform_(w, -in_dim ** -0.5, in_dim ** -0.5)
    return nn.Parameter(w)


class _FactoredAttention(nn.Module):
    """Shared parts of the inducing-point (eq. 15-16) and task-indicator (eq. 18) attentions.

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
        self.norm = StackedLayerNorm(n_layers, dim)

    def _score_factor(self, queries: torch.Tensor, layers: slice) -> torch.Tensor:
        """(L', d, Q, M): W^K_m Q_m^T per layer and head, scaled by 1/sqrt(d_head)."""
        n, d, m, h = queries.shape[0], self.dim, self.heads, self.head_dim
        q = queries.reshape(n, queries.shape[1], m, h)
        return torch.einsum("lemh,lqmh->leqm", self.w_key[layers].reshape(n, d, m, h), q) * h ** -0.5

    def _value_out(self, layers: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(L', M d, d) stacked W^V_m W^O_m blocks and the (L', 1, d) folded bias."""
        w_v, w_o = self.w_value[layers], self.w_out[layers]
        n, d, m, h = w_v.shape[0], self.dim, self.heads, self.head_dim
        combined = torch.einsum("lemh,lmho->lmeo", w_v.reshape(n, d, m, h), w_o.reshape(n, m, h, d))
        bias = torch.bmm(self.b_value[layers].unsqueeze(1), w_o) + self.b_out[layers]
        return combined.reshape(n, m * d, d), bias


class InducingPointAttention(_FactoredAttention):
    """ASRG's feature-interaction layer (eq. 14-17) for a stack of L layers.

    Q_hat = I (.) z_K (eq. 14); O = concat_m softmax(Q_hat_m K_m^T / sqrt(d_m)) V_m W^O with
    K = S W^K, V = S W^V (eq. 15-16); Y_ASRG = LayerNorm(Q_hat + O) (eq. 17, the Set-Transformer MAB
    reading of the paper's "LayerNorm(O, H)": the residual is the K-row query, since H has F rows).
    """

    def __init__(self, n_layers: int, n_points: int, dim: int, heads: int) -> None:
        super().__init__(n_layers, dim, heads)
        self.inducing = nn.Parameter(torch.randn(n_layers, n_points, dim) * dim ** -0.5)
        self.n_points = n_points

    def forward(self, source: torch.Tensor, mask: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """source (B, S, d) attended by the layers in ``layers``; mask z_K (B, L', K) -> Y (L', B, K, d)."""
        b, s, d = source.shape
        inducing = self.inducing[layers]
        n, k, m = inducing.shape[0], self.n_points, self.heads
        factor = self._score_factor(inducing, layers)  # (L', d, K, M)
        # score columns ordered (layer, head, point): the mask then broadcasts over a contiguous K axis
        factor = factor.permute(1, 0, 3, 2).reshape(d, n * m * k)
        pooled = masked_softmax_pool(source, factor, mask.view(b, 1, n, 1, k), (n, m, k))  # (B, L' M K, d)
        pooled = pooled.view(b, n, m, k, d).permute(1, 0, 3, 2, 4).reshape(n, b * k, m * d)
        combined, bias = self._value_out(layers)
        out = torch.baddbmm(bias, pooled, combined).view(n, b, k, d)
        # eq. 17's residual Q_hat + O, with Q_hat = I (.) z_K (eq. 14) fused into one pass, (L', B, K, d)
        return self.norm(torch.addcmul(out, inducing.unsqueeze(1), mask.transpose(0, 1).unsqueeze(-1)), layers)


class PatternSelector(_FactoredAttention):
    """Explicit Pattern Selector (eq. 18-19) over a stack of shared representations.

    F_i^k = Attention(alpha_i^k, Y^k, Y^k) with eq. 15-16's multi-head attention (eq. 18), and
    T_i^k = LayerNorm(T_i^{k-1} + F_i^k) (eq. 19), with T_i^1 = LayerNorm(F_i^1) since T^0 is ignored.
    ``task_indicators=False`` (the "w/o PS" ablation) uses the task-agnostic mean of Y^k's rows as F^k.
    """

    def __init__(self, n_layers: int, n_tasks: int, dim: int, heads: int, task_indicators: bool = True) -> None:
        super().__init__(n_layers, dim, heads)
        self.n_tasks = n_tasks
        self.task_indicators = task_indicators
        if task_indicators:
            self.indicator = nn.Parameter(torch.randn(n_layers, n_tasks, dim) * dim ** -0.5)
        else:  # the ablation has no attention parameters
            for name in ("w_key", "w_value", "b_value", "w_out", "b_out"):
                delattr(self, name)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        """shared (L, B, R, d) -> T^L (B, N, d)."""
        n, b, r, d = shared.shape
        t_count, m = self.n_tasks, self.heads
        if self.task_indicators:
            factor = self._score_factor(self.indicator, slice(None)).reshape(n, d, t_count * m)
            weights = torch.softmax(torch.bmm(shared.reshape(n, b * r, d), factor).view(n * b, r, t_count * m), dim=1)
            pooled = torch.bmm(weights.transpose(1, 2), shared.reshape(n * b, r, d))  # (L B, N M, d)
            combined, bias = self._value_out(slice(None))
            task_parts = torch.baddbmm(bias, pooled.view(n, b * t_count, m * d), combined).view(n, b, t_count, d)
        else:
            task_parts = shared.mean(dim=2, keepdim=True).expand(n, b, t_count, d)
        t = self.norm(task_parts[0], 0)
        for layer in range(1, n):
            t = self.norm(t + task_parts[layer], layer)
        return t
