"""APEM's predict-time lookup tables as they were before the exp-free, LayerNorm-fused
:class:`apem.models.apem_folded.FoldedAPEM` (commit cbc415e), kept verbatim so
``bench_speed_table.py`` measures before and after in the same run. Not used by the library."""

from __future__ import annotations

import torch
from torch import nn

from apem.models.base import ModelOutput
from apem.nn.attention import softmax_over_sources_


class PreviousFoldedAPEM(nn.Module):
    """Inference-only APEM (``layer_input="fields"``) with the per-field products folded into tables.

    Every ASRG layer attends over the field embeddings H, whose rows are rows of the one embedding
    table E (C x d, C = sum of field cardinalities). So eq. 15's factored scores S_b (W^K_m I_m^T)
    and the folded values S_b (W^V_m W^O_m) (:meth:`apem.nn.attention.InducingPointAttention.folded_weights`) are
    lookups into per-layer tables E (W^K_m I_m^T) (C x M K) and E (W^V_m W^O_m) (C x M d), computed
    once from the frozen weights: per batch the two GEMMs over B F rows become gathers. The
    selector, eq. 17, the Pattern Selector and the towers are the model's own code. Agrees with
    ``APEM.forward`` to float rounding; build a new one after the weights change.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        asrg = model.asrg
        n, m, d = model.config.layers, asrg.heads, model.config.embed_dim
        with torch.no_grad():
            table = model.embedding.embedding.weight
            factor, combined, bias = asrg.folded_weights()
            self.register_buffer("score_tables", torch.matmul(table, factor).contiguous())  # (L, C, M K)
            # each head's attention weights sum to 1 over the fields, so W^V W^O's folded bias enters
            # as bias / M on every value row: the pooling bmm then needs no bias pass
            values = torch.matmul(table, combined).view(n, -1, m, d) + bias.unsqueeze(1) / m
            self.register_buffer("value_tables", values.reshape(n, -1, m * d).contiguous())  # (L, C, M d)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        model, asrg = self.model, self.model.asrg
        idx = x + model.embedding.offsets
        mask = model.selector_mask(model.embedding.embedding(idx))  # (B, L, K)
        b, s = idx.shape
        n, k, m, d = self.score_tables.shape[0], asrg.n_points, asrg.heads, model.config.embed_dim
        out = mask.new_empty(n, b, k, d)
        for layer in range(n):
            scores = nn.functional.embedding(idx, self.score_tables[layer]).view(b, s, m, k)
            scores = softmax_over_sources_(scores.mul_(mask[:, layer].reshape(b, 1, 1, k)).view(b, s, m * k))
            values = nn.functional.embedding(idx, self.value_tables[layer]).view(b, s * m, d)
            torch.bmm(scores.view(b, s * m, k).transpose(1, 2), values, out=out[layer])
        return model.head(asrg.residual_norm(out, mask), mask)
