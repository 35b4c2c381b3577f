"""Shared-Bottom baseline (Caruana 1997; APEM paper sec. 4.1.2).

One shared embedding and bottom MLP learn the common representation; one tower per task predicts the
entire-space P(T_i = 1 | X). Sizes follow the Single-Task MLP [256, 128, 64] split into a shared
bottom [256, 128] and task towers [64], so the two baselines differ only in what is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apem.models.base import EmbeddingConfig, TowerModel
from apem.models.registry import register_model
from apem.nn.layers import MLP


@dataclass
class SharedBottomConfig(EmbeddingConfig):
    bottom_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


@register_model("shared_bottom")
class SharedBottom(TowerModel):
    name = "Shared-Bottom"
    Config = SharedBottomConfig

    def build(self) -> None:
        cfg = self.config
        self.bottom = MLP(self.flat_dim, cfg.bottom_hidden, dropout=cfg.dropout)
        self.towers = self.make_towers(self.bottom.out_dim, cfg.tower_hidden, cfg.dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:
        return self.bottom(h.flatten(1)).unsqueeze(1).expand(-1, self.n_tasks, -1)  # (B, N, D)
