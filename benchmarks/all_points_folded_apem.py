"""APEM's predict-time module :class:`apem.models.apem_folded.FoldedAPEM` as it was before it skipped the
points no row of a chunk selects (commit e03a87e: every chunk computes all K points): the methods that
changed are kept verbatim (eq. 18's pooling is the library's, over all K rows with the row weights the
old code used), the tables are built by the library's class, so ``bench_speed_table.py`` measures before
and after in the same run. Not used by the library."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from apem.models.apem_folded import FoldedAPEM
from apem.models.base import ModelOutput


class AllPointsFoldedAPEM(FoldedAPEM):
    """:class:`FoldedAPEM` over all K points of every chunk (the mean value rows from one more table)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        with torch.no_grad():
            m, d = self.heads, self.dim
            self.register_buffer("head_sum_tables", self.value_tables.view(self.layers, -1, m, d).sum(dim=2))

    def _forward_chunk(self, x: torch.Tensor) -> ModelOutput:
        model = self.model
        idx, z, binary, fixes = self._selection(x)
        t = None
        for layer in range(self.layers):
            z_l = z[:, layer]
            pre_norm = self._binary_pool(idx, z_l, layer) if binary else self._general_pool(idx, z_l, layer)
            if fixes[layer] is not None:
                rows, points, exact = fixes[layer]
                pre_norm[rows, points] = exact
            task_part = self._task_part(pre_norm, None if self.uniform else z_l, layer)
            t = model.pattern_selector.norm(task_part if t is None else t + task_part, layer)
        logits = model.towers(t)
        return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})

    def _binary_pool(self, idx: torch.Tensor, z: torch.Tensor, layer: int) -> torch.Tensor:
        """X = O + z I of one layer where z is 0 or 1, without exps; fractional entries are left to fix-ups."""
        b, s = idx.shape
        m, k, d = self.heads, self.points, self.dim
        weights = functional.embedding(idx, self.exp_tables[layer])  # (B, S, M K)
        scale = weights.sum(dim=1).reciprocal_().view(b, m, k)
        selected = z == 1
        if self.uniform:  # a de-selected point attends uniformly: its output is the mean of the value rows
            scale.mul_(selected.unsqueeze(1))
            mean_values = functional.embedding_bag(idx, self.head_sum_tables[layer], mode="mean")
            start = torch.lerp(mean_values.unsqueeze(1), self.inducing[layer], selected.unsqueeze(-1).to(scale.dtype))
        else:  # "contributes_nothing": a de-selected row has weight 0 downstream, any finite value will do
            start = self.inducing[layer].expand(b, k, d).clone()
        weights.mul_(scale.view(b, 1, m * k))
        values = functional.embedding(idx, self.value_tables[layer]).view(b, s * m, d)
        return start.baddbmm_(weights.view(b, s * m, k).transpose(1, 2), values)
