"""Single-Task baseline (APEM paper sec. 4.1.2): an independent embedding-MLP per step.

Each task has its own embedding of every field and its own MLP [256, 128, 64] -> 1; nothing is
shared. The N embeddings are one table of width N d (one lookup), split per task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apem.models.base import EmbeddingConfig, TowerModel
from apem.models.registry import register_model


@dataclass
class SingleTaskConfig(EmbeddingConfig):
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0


@register_model("single_task")
class SingleTask(TowerModel):
    name = "Single-Task"
    Config = SingleTaskConfig

    @property
    def embedding_copies(self) -> int:  # one embedding per task
        return self.n_tasks

    def build(self) -> None:
        self.towers = self.make_towers(self.flat_dim, self.config.hidden, self.config.dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:
        b, f, nd = h.shape  # (B, F, N d) -> (B, N, F d): task i reads only its own copy
        d = nd // self.n_tasks  # explicit sizes: -1 is ambiguous for an empty batch
        return h.view(b, f, self.n_tasks, d).transpose(1, 2).reshape(b, self.n_tasks, f * d)
