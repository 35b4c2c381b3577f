"""MMoE baseline: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

Shared experts (MLPs on the flattened field embeddings) and one softmax gate per task:
``f_i(x) = sum_e g_i(x)_e * expert_e(x)``, ``g_i(x) = softmax(W_i x)`` (MMoE eq. 5-6), then one tower
per task giving the entire-space P(T_i = 1 | X).

Departure: the MMoE paper tunes the expert count and sizes per dataset; the defaults here (4 experts of
[256, 128], towers [64]) mirror the Shared-Bottom sizes so the comparison isolates the gating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.layers import MLP, FieldEmbedding
from apem.models.base import FieldSpec, LossConfig, ModelOutput, MultiTaskModel


class ExpertGroup(nn.Module):
    """``count`` independent MLP experts on one input: (B, in) -> (B, count, out)."""

    def __init__(self, in_dim: int, count: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, hidden, dropout=dropout) for _ in range(count))
        self.out_dim = self.experts[0].out_dim if count else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)


def gated_mixture(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """MMoE eq. 5: softmax gate weights (B, E) mix expert outputs (B, E, D) into (B, D)."""
    return torch.bmm(torch.softmax(gate_logits, dim=-1).unsqueeze(1), experts).squeeze(1)


@dataclass
class MMoEConfig:
    embed_dim: int = 18
    n_experts: int = 4
    expert_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


class MMoE(MultiTaskModel):
    name = "MMoE"
    Config = MMoEConfig

    def __init__(self, fields: list[FieldSpec], n_tasks: int, config: MMoEConfig | None = None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__(fields, n_tasks, config, loss_config)
        cfg = self.config
        in_dim = len(fields) * cfg.embed_dim
        self.embedding = FieldEmbedding(fields, cfg.embed_dim)
        self.experts = ExpertGroup(in_dim, cfg.n_experts, cfg.expert_hidden, cfg.dropout)
        self.gates = nn.ModuleList(nn.Linear(in_dim, cfg.n_experts) for _ in range(n_tasks))
        self.towers = nn.ModuleList(
            MLP(self.experts.out_dim, cfg.tower_hidden, out_dim=1, dropout=cfg.dropout) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        inputs = self.embedding(x).flatten(1)
        experts = self.experts(inputs)
        logits = [tower(gated_mixture(gate(inputs), experts)) for gate, tower in zip(self.gates, self.towers)]
        return ModelOutput(probs=torch.sigmoid(torch.cat(logits, dim=1)))
