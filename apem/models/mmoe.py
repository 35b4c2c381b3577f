"""MMoE baseline (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.models.base import EmbeddingConfig, TowerModel
from apem.models.experts import ExpertGroup, gated_mixture
from apem.models.registry import register_model


@dataclass
class MMoEConfig(EmbeddingConfig):
    n_experts: int = 4
    expert_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


@register_model("mmoe")
class MMoE(TowerModel):
    name = "MMoE"
    Config = MMoEConfig

    def build(self) -> None:
        cfg = self.config
        self.experts = ExpertGroup(self.flat_dim, cfg.n_experts, cfg.expert_hidden, cfg.dropout)
        self.gates = nn.Linear(self.flat_dim, self.n_tasks * cfg.n_experts)  # all N gates in one matmul
        self.towers = self.make_towers(self.experts.out_dim, cfg.tower_hidden, cfg.dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:
        inputs = h.flatten(1)
        gate_logits = self.gates(inputs).view(inputs.shape[0], self.n_tasks, self.config.n_experts)  # (B, N, E)
        return gated_mixture(gate_logits, self.experts(inputs))  # (B, N, D)
