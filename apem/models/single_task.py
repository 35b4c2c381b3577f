"""Single-Task baseline (APEM paper, sec. 4.1.2): one independent MLP [256, 128, 64] per task.

Each task owns its embedding table and its MLP, so nothing is shared between tasks; this is why it is
the largest model in the paper's Fig 8(b). Every task is trained on its own entire-space label
P(T_i = 1 | X) (eq 20's BCE with sigma = 0, the base loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.layers import MLP, FieldEmbedding
from apem.models.base import FieldSpec, LossConfig, ModelOutput, MultiTaskModel


@dataclass
class SingleTaskConfig:
    embed_dim: int = 18
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0


class SingleTask(MultiTaskModel):
    name = "Single-Task"
    Config = SingleTaskConfig

    def __init__(self, fields: list[FieldSpec], n_tasks: int, config: SingleTaskConfig | None = None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__(fields, n_tasks, config, loss_config)
        cfg = self.config
        self.embeddings = nn.ModuleList(FieldEmbedding(fields, cfg.embed_dim) for _ in range(n_tasks))
        in_dim = len(fields) * cfg.embed_dim
        self.towers = nn.ModuleList(
            MLP(in_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        logits = [tower(embed(x).flatten(1)) for embed, tower in zip(self.embeddings, self.towers)]
        return ModelOutput(probs=torch.sigmoid(torch.cat(logits, dim=1)))
