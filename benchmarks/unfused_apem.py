"""APEM's predict path as it was before the fused inference kernel (commit 515eb8c): the ASRG kernel
(``gathered_pool.c``) writes every point's row of Y, then eq. 18's kernel (``row_attention_pool.c``) reads
them back, over all K points (eq. 19's chain as the library runs it now). The model's own modules run in
turn, so ``bench_speed_table.py`` measures before and after in the same run. Not used by the library."""

from __future__ import annotations

import torch
from torch import nn

from apem.models.base import ModelOutput


class UnfusedAPEM(nn.Module):
    """Eval-mode APEM through ``asrg`` then ``head``, the two poolings in turn (``model``: an APEM)."""

    parallel_batches = True  # as APEM itself: batches side by side on CPU

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> ModelOutput:
        model = self.model
        rows, index = model.embedding.distinct_rows(x)
        mask = model.selector_mask(nn.functional.embedding(index, rows))
        return model.head(model.asrg(rows, mask, index=index), mask)
