"""Mixture-of-experts parts shared by MMoE and PLE."""

from __future__ import annotations

import torch
from torch import nn

from apem.nn.layers import MLP


class ExpertGroup(nn.Module):
    """``count`` independent MLP experts on one input: (B, in) -> (B, count, out)."""

    def __init__(self, in_dim: int, count: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, hidden, dropout=dropout) for _ in range(count))
        self.out_dim = self.experts[0].out_dim if count else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([expert(x) for expert in self.experts], dim=1)


def gated_mixture(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """MMoE eq. 5: softmax gate weights (B, [G,] E) mix expert outputs (B, E, D) into (B, [G,] D)."""
    weights = torch.softmax(gate_logits, dim=-1)
    if weights.dim() == 2:
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)
    return torch.bmm(weights, experts)
