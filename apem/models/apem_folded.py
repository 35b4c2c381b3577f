"""Inference-only APEM with the per-field products folded into lookup tables (:class:`FoldedAPEM`).

With ``layer_input="fields"`` every ASRG layer attends over the field embeddings H, whose rows are
rows of the one embedding table E (C x d, C = sum of field cardinalities). So every product of H
with a frozen weight is a lookup into a table computed once:

- the selector MLP's first layer (eq. 11): flatten(H) W_1 = sum_f E[x_f] W_1^(f), one C x hidden table
  summed per row (``embedding_bag``) instead of a (F d x hidden) product;
- eq. 15's scores E (W^K_m I_m^T) (C x M K) and the folded values E (W^V_m W^O_m) + bias / M (C x M d)
  (:meth:`apem.nn.attention.InducingPointAttention.folded_weights`).

Binary z_K (gamma at its floor: f_D gives exact 0s and 1s). Where z_k = 1 the scores are the table
entries themselves, so the softmax weights are exp(T[x]) / sum_s exp(T[x_s]); a constant shift per
column cancels, so a table of exp(T - column max) removes every exp at run time (kept only when every
column's range stays far from float32 underflow). Where z_k = 0 the scores are 0: under
``"uniform_attention"`` the point outputs mean_s sum_m V[x_s, m] (weight 1 / S on every value row);
under ``"contributes_nothing"`` its row gets weight 0 in the Pattern Selector, so its value is never
used. The rare entries with a fractional z (|logit| < gamma / 2) are recomputed exactly, and a batch
with many of them (gamma not annealed) takes the general path, which keeps the exp.

Skipped points (binary path). A trained selector's choices are shared by most rows (on the synthetic funnel
at Table 2's sizes about half of a layer's points are selected in every row, a third in none), so a chunk of rows
computes only the points some row selects (:meth:`FoldedAPEM._chunk_points`), with no per-(row, point)
gather. The others weigh 0 in eq. 18 under "contributes_nothing"; under "uniform_attention" they all
equal the row's mean value row, so one slot weighted by their count stands for them all.

Eq. 17 and the Pattern Selector are fused: with X = O + z I and Y = LayerNorm(X) = (X - mu) / sigma * w + b,
the selector's scores Y W = ((X W') - mu 1^T W') / sigma + const (W' = diag(w) W, the constant
cancels in the softmax over rows), and its pooled rows sum_k a_k Y_k = w (.) (sum_k (a_k / sigma_k)(X_k - mu_k))
+ b sum_k a_k. So the (L, B, K, d) LayerNorm output is never written: per layer one transposed product
for the scores and means, one for the squares, and the pooling bmm. Rows are processed in chunks of
``chunk_rows`` so a layer's (rows, K, d) tensors stay in cache.

Agrees with ``APEM.forward`` to float rounding; build a new one after the weights change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from apem.models.base import ModelOutput
from apem.nn.attention import softmax_over_sources_
from apem.nn.selection import dynamic_activation

# exp(-MAX_EXP_RANGE) ~ 9e-27 stays a normal float32 (smallest ~1.2e-38) even summed over few fields
MAX_EXP_RANGE = 60.0
# above this share of fractional z entries in a chunk, the general (exp) path is cheaper than fix-ups
MAX_FRACTIONAL_SHARE = 0.05
DEFAULT_CHUNK_ROWS = 512


class FoldedAPEM(nn.Module):
    """Eval-mode APEM (dynamic activation, ``layer_input="fields"``, no dense fields) over lookup tables.

    ``model`` is an :class:`apem.models.apem_model.APEM` (not imported: that module imports this one)."""

    parallel_batches = True  # many small ops: :func:`apem.inference.predict.predict_stream` runs batches side by side

    def __init__(self, model: nn.Module, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        super().__init__()
        self.model, self.chunk_rows = model, chunk_rows
        c, asrg = model.config, model.asrg
        self.layers, self.points, self.heads, self.dim = c.layers, c.inducing_points, c.heads, c.embed_dim
        self.uniform = c.deselected_point == "uniform_attention"
        with torch.no_grad():
            self._build_selector_table(model)
            self._build_attention_tables(model)
            self._build_head(model)
            self.register_buffer("inducing", asrg.inducing.detach().clone())  # (L, K, d)

    def _build_selector_table(self, model: nn.Module) -> None:
        """Eq. 11's first Linear as a (C, hidden) table: row c of field f is E[c] W_1^(f)."""
        first = model.selector.net[0]
        table, offsets = model.embedding.embedding.weight, model.embedding.offsets.tolist() + [None]
        d = self.dim
        parts = [table[start:end] @ first.weight[:, f * d:(f + 1) * d].t()
                 for f, (start, end) in enumerate(zip(offsets[:-1], offsets[1:]))]
        self.register_buffer("selector_table", torch.cat(parts).contiguous())
        self.register_buffer("selector_bias", first.bias.detach().clone())
        self.selector_rest = model.selector.net[1:]

    def _build_attention_tables(self, model: nn.Module) -> None:
        n, m, d = self.layers, self.heads, self.dim
        table = model.embedding.embedding.weight
        factor, combined, bias = model.asrg.folded_weights()
        scores = torch.matmul(table, factor)  # (L, C, M K), columns (head, point)
        self.register_buffer("score_tables", scores.contiguous())
        # each head's weights sum to 1 over the fields, so the folded bias enters as bias / M per value row
        values = torch.matmul(table, combined).view(n, -1, m, d) + bias.unsqueeze(1) / m
        self.register_buffer("value_tables", values.reshape(n, -1, m * d).contiguous())  # (L, C, M d)
        top, bottom = scores.amax(dim=1, keepdim=True), scores.amin(dim=1, keepdim=True)
        usable = float((top - bottom).max()) <= MAX_EXP_RANGE
        self.register_buffer("exp_tables", torch.exp(scores - top).contiguous() if usable else None)

    def _build_head(self, model: nn.Module) -> None:
        """Eq. 17's affine folded into the Pattern Selector's score factor (see the module docstring)."""
        ps, norm = model.pattern_selector, model.asrg.norm
        n, d = self.layers, self.dim
        self.task_indicators = ps.task_indicators
        if ps.task_indicators:
            factor = ps.attention.score_factor(ps.indicator, slice(None)).reshape(n, d, -1)  # (L, d, N M)
            combined, bias = ps.attention.value_out(slice(None))
            self.register_buffer("ps_combined", combined.contiguous())  # (L, M d, d)
            self.register_buffer("ps_bias", bias.contiguous())  # (L, 1, d)
        else:
            factor = torch.zeros(n, d, 0)
        folded = norm.weight.detach().unsqueeze(-1) * factor  # diag(w) W
        ones = torch.ones(n, d, 1)
        self.register_buffer("score_rows", torch.cat([folded, ones], dim=2).transpose(1, 2).contiguous())  # (L, NM+1, d)
        self.register_buffer("score_shift", folded.sum(dim=1).unsqueeze(-1).contiguous())  # (L, NM, 1)
        self.register_buffer("norm_weight", norm.weight.detach().clone())
        self.register_buffer("norm_bias", norm.bias.detach().clone())
        self.register_buffer("ones", torch.ones(d, 1))
        self.eps = 1e-5  # StackedLayerNorm's (torch's default)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if x.shape[0] <= self.chunk_rows:
            return self._forward_chunk(x)
        parts = [self._forward_chunk(x[i:i + self.chunk_rows]) for i in range(0, x.shape[0], self.chunk_rows)]
        logits = torch.cat([p.aux["logits"] for p in parts])
        return ModelOutput(probs=torch.cat([p.probs for p in parts]), aux={"logits": logits})

    def _selection(self, x: torch.Tensor) -> tuple:
        """(table rows idx (B, S), z_K (B, L, K), whether the binary path applies, the per-layer fix-ups)."""
        idx = x + self.model.embedding.offsets
        hidden = functional.embedding_bag(idx, self.selector_table, mode="sum") + self.selector_bias
        z = dynamic_activation(self.selector_rest(hidden), self.model.gamma).view(-1, self.layers, self.points)
        z_by_layer = z.transpose(0, 1)  # (L, B, K)
        fractional = (z_by_layer > 0) & (z_by_layer < 1)
        binary = self.exp_tables is not None and int(fractional.sum()) <= MAX_FRACTIONAL_SHARE * z.numel()
        fixes = self._exact_points(idx, z_by_layer, fractional) if binary else [None] * self.layers
        return idx, z, binary, fixes

    def _forward_chunk(self, x: torch.Tensor) -> ModelOutput:
        model = self.model
        idx, z, binary, fixes = self._selection(x)
        used = (z > 0).any(dim=0) if binary else None  # (L, K): points some row of the chunk selects
        t = None
        for layer in range(self.layers):
            z_l = z[:, layer]
            if binary:
                columns, z_l, row_weights = self._chunk_points(z_l, used[layer])
                pre_norm = self._binary_pool(idx, z_l, columns, layer)
            else:
                row_weights = None if self.uniform else z_l
                pre_norm = self._general_pool(idx, z_l, layer)
            if fixes[layer] is not None:
                rows, points, exact = fixes[layer]
                pre_norm[rows, self._positions(columns)[points]] = exact
            task_part = self._task_part(pre_norm, row_weights, layer)
            t = model.pattern_selector.norm(task_part if t is None else t + task_part, layer)
        logits = model.towers(t)
        return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})

    def _chunk_points(self, z: torch.Tensor, used: torch.Tensor) -> tuple:
        """The points one layer computes for a chunk, (columns, their z (B, P), eq. 18's row weights).

        The selector's choices are shared by most rows (points almost always or almost never
        selected), so the points no row of the chunk selects are skipped for the whole chunk: no
        (row, point) gather. Under "contributes_nothing" they have weight 0 in eq. 18; under
        "uniform_attention" they all equal the row's mean value row, so one extra slot (a de-selected
        column, z = 0) stands for them with their count as its row weight (None: a plain softmax)."""
        columns = used.nonzero().view(-1)
        if columns.numel() == 0:  # keep one (de-selected) column so every shape stays non-empty
            columns = used.new_zeros(1, dtype=torch.long)
        chosen = z.index_select(1, columns)
        if not self.uniform:
            return columns, chosen, chosen
        rest = self.points - columns.numel()
        if rest == 0:
            return columns, chosen, None
        row_weights = torch.ones(1, columns.numel() + 1)
        row_weights[0, -1] = rest
        return torch.cat([columns, columns[:1]]), functional.pad(chosen, (0, 1)), row_weights

    def _positions(self, columns: torch.Tensor) -> torch.Tensor:
        """Where each of the K points sits among ``columns`` (the first occurrence; -1 if absent)."""
        positions = torch.full((self.points,), -1, dtype=torch.long)
        return positions.index_put_((columns.flip(0),), torch.arange(columns.numel() - 1, -1, -1))

    def _general_pool(self, idx: torch.Tensor, z: torch.Tensor, layer: int) -> torch.Tensor:
        """X = O + z I of one layer for any z (eq. 14-17 before the norm), (B, K, d), with run-time exps."""
        b, s = idx.shape
        m, k, d = self.heads, self.points, self.dim
        scores = functional.embedding(idx, self.score_tables[layer]).view(b, s, m, k)
        weights = softmax_over_sources_(scores.mul_(z.view(b, 1, 1, k)).view(b, s, m * k))
        values = functional.embedding(idx, self.value_tables[layer]).view(b, s * m, d)
        return (z.unsqueeze(-1) * self.inducing[layer]).baddbmm_(weights.view(b, s * m, k).transpose(1, 2), values)

    def _binary_pool(self, idx: torch.Tensor, z: torch.Tensor, columns: torch.Tensor, layer: int) -> torch.Tensor:
        """X = O + z I of one layer at the points ``columns`` (z (B, P) there is 0 or 1), (B, P, d),
        without exps; fractional entries are left to fix-ups."""
        b, s = idx.shape
        m, k, d, p = self.heads, self.points, self.dim, columns.numel()
        weights = self._exp_weights(idx, columns, layer)  # (B, S, M P)
        scale = weights.sum(dim=1).reciprocal_().view(b, m, p)
        selected = z == 1
        inducing = self.inducing[layer].index_select(0, columns)
        if self.uniform:  # a de-selected point attends uniformly (weight 1 / S): its output is the mean value row
            scale.mul_(selected.unsqueeze(1))
            uniform = (~selected).to(scale.dtype).div_(s).unsqueeze(1).expand(b, m, p)
            torch.addcmul(uniform.reshape(b, 1, m * p), weights, scale.view(b, 1, m * p), out=weights)
            start = inducing * selected.unsqueeze(-1)
        else:  # "contributes_nothing": a de-selected row has weight 0 downstream, any finite value will do
            weights.mul_(scale.view(b, 1, m * p))
            start = inducing.expand(b, p, d).clone()
        values = functional.embedding(idx, self.value_tables[layer]).view(b, s * m, d)
        return start.baddbmm_(weights.view(b, s * m, p).transpose(1, 2), values)

    def _exp_weights(self, idx: torch.Tensor, columns: torch.Tensor, layer: int) -> torch.Tensor:
        """exp(scores - column max) of the rows' fields at the points ``columns``, (B, S, M P)."""
        table = self.exp_tables[layer]  # (C, M K)
        b, s = idx.shape
        m, k, p = self.heads, self.points, columns.numel()
        if p == k and bool((columns == torch.arange(k)).all()):
            return functional.embedding(idx, table)
        if table.shape[0] <= idx.numel():  # copying the table's columns is cheaper than compacting the lookups
            return functional.embedding(idx, table.view(-1, k).index_select(1, columns).view(-1, m * p))
        return functional.embedding(idx, table).view(b * s * m, k).index_select(1, columns).view(b, s, m * p)

    def _exact_points(self, idx: torch.Tensor, z: torch.Tensor, fractional: torch.Tensor) -> list:
        """X = O + z I for the entries with a fractional z (all layers in one pass); per layer
        (rows, points, values) or None. ``z`` and ``fractional`` are (L, B, K)."""
        layers, rows, points = fractional.nonzero(as_tuple=True)  # sorted by layer
        if rows.numel() == 0:
            return [None] * self.layers
        n, s = rows.numel(), idx.shape[1]
        m, k, d = self.heads, self.points, self.dim
        z_f = z[layers, rows, points]
        table_rows = (idx[rows] + (layers * self.score_tables.shape[1]).unsqueeze(1)).view(-1)  # (n S)
        scores = self.score_tables.view(-1, m, k).index_select(0, table_rows).view(n, s * m, k)
        scores = scores.gather(2, points.view(n, 1, 1).expand(n, s * m, 1)).view(n, s, m)
        weights = torch.softmax(scores * z_f.view(n, 1, 1), dim=1)
        values = self.value_tables.view(-1, m * d).index_select(0, table_rows).view(n, s * m, d)
        exact = torch.bmm(weights.view(n, 1, s * m), values).view(n, d)
        exact.addcmul_(z_f.unsqueeze(1), self.inducing[layers, points])
        counts = torch.bincount(layers, minlength=self.layers).tolist()
        return [None if not c else parts for c, parts in
                zip(counts, zip(rows.split(counts), points.split(counts), exact.split(counts)))]

    def _task_part(self, pre_norm: torch.Tensor, row_weights: torch.Tensor | None, layer: int) -> torch.Tensor:
        """F^k (B, N, d) of eq. 18 from X = O + z I (B, P, d), eq. 17's LayerNorm fused in; ``row_weights``
        ((B or 1, P), None: all 1) weigh each row in the selector's softmax (see :meth:`_selector_weights`)."""
        b, k, d = pre_norm.shape
        flat = pre_norm.view(b * k, d)
        projected = self.score_rows[layer] @ flat.t()  # (NM + 1, B K): X W' and the row sums
        mean = projected[-1] / d
        variance = (flat.square() @ self.ones).view(-1) / d - mean.square()
        inv_std = variance.clamp_min_(0).add_(self.eps).rsqrt_()
        weights = self._selector_weights(projected[:-1], mean, inv_std, row_weights, (b, k), layer)  # (Q, B, P)
        scaled = weights * inv_std.view(1, b, k)
        pooled = torch.bmm(scaled.transpose(0, 1), pre_norm)  # (B, Q, d)
        centre = (scaled * mean.view(1, b, k)).sum(dim=-1).t().unsqueeze(-1)  # (B, Q, 1)
        total = weights.sum(dim=-1).t().unsqueeze(-1)
        rows = torch.addcmul(self.norm_bias[layer] * total, pooled - centre, self.norm_weight[layer])  # sum_k a_k Y_k
        if not self.task_indicators:
            return rows.expand(b, self.model.n_tasks, d)
        heads_rows = rows.reshape(b * self.model.n_tasks, self.ps_combined.shape[1])  # explicit sizes, as above
        parts = heads_rows @ self.ps_combined[layer] + self.ps_bias[layer]
        return parts.view(b, self.model.n_tasks, d)

    def _selector_weights(self, raw: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor,
                          row_weights: torch.Tensor | None, shape: tuple[int, int], layer: int) -> torch.Tensor:
        """Eq. 18's attention weights over the P rows per (task, head), (Q, B, P); Q = 1 for the mean
        of "w/o PS". A row weighs ``row_weights`` (:func:`apem.nn.attention.weighted_softmax`): z_k under
        "contributes_nothing", the number of points a row stands for under "uniform_attention"."""
        b, k = shape
        if not self.task_indicators:
            weights = torch.ones(1, b, k) if row_weights is None else row_weights.expand(b, k).unsqueeze(0)
            return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        scores = raw.addcmul(self.score_shift[layer], mean.view(1, -1), value=-1.0)
        scores = scores.mul_(inv_std.view(1, -1)).view(raw.shape[0], b, k)  # explicit: -1 is ambiguous for B = 0
        if row_weights is None:
            return torch.softmax(scores, dim=-1)
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * row_weights.unsqueeze(0)
        return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
