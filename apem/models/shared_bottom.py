"""Shared-Bottom baseline (Caruana 1997; APEM paper sec. 4.1.2).

One shared embedding and bottom MLP learn the common representation; one tower per task predicts the
entire-space P(T_i = 1 | X). Sizes follow the Single-Task MLP [256, 128, 64] split into a shared
bottom [256, 128] and task towers [64], so the two baselines differ only in what is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.layers import MLP, FieldEmbedding
from apem.models.base import FieldSpec, LossConfig, ModelOutput, MultiTaskModel


@dataclass
class SharedBottomConfig:
    embed_dim: int = 18
    bottom_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


class SharedBottom(MultiTaskModel):
    name = "Shared-Bottom"
    Config = SharedBottomConfig

    def __init__(self, fields: list[FieldSpec], n_tasks: int, config: SharedBottomConfig | None = None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__(fields, n_tasks, config, loss_config)
        cfg = self.config
        self.embedding = FieldEmbedding(fields, cfg.embed_dim)
        self.bottom = MLP(len(fields) * cfg.embed_dim, cfg.bottom_hidden, dropout=cfg.dropout)
        self.towers = nn.ModuleList(
            MLP(self.bottom.out_dim, cfg.tower_hidden, out_dim=1, dropout=cfg.dropout) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        shared = self.bottom(self.embedding(x).flatten(1))
        logits = torch.cat([tower(shared) for tower in self.towers], dim=1)
        return ModelOutput(probs=torch.sigmoid(logits))
