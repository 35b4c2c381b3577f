"""AITM baseline: Adaptive Information Transfer Multi-task (Xi et al., KDD 2021), following the official
code ``xidongbo/AITM`` (``AITM_standard.py``, the N-task variant).

- One MLP tower per task on the flattened field embeddings gives q_t.
- Task 1: z_1 = q_1. Task t >= 2: the transferred info p_{t-1} = ReLU(Dense(z_{t-1})) (+ dropout), and
  the Adaptive Information Transfer (AIT) module attends over the pair {q_t, p_{t-1}}:
  a_u = softmax_u(<u W_Q, u W_K> / sqrt(k)), z_t = sum_u a_u * (u W_V), with W_Q, W_K, W_V (k x k,
  no bias) shared by all tasks, as in the official code.
- P(T_t = 1 | X) = sigmoid(Dense(z_t)), entire space.
- Loss: sum_t BCE(y_t, o_t) (the base L_M) plus the behavioral expectation calibrator
  ``calibrator_weight * mean_x sum_{t>=2} max(y_t - y_{t-1}, 0)`` (official ``label_constraint``).

Departures from the official code: no batch normalisation in the towers and transfer layers (the
shared MLP block has none; dropout is kept); each tower layer feeds the next (the official
``tower()`` applies every Dense to the raw embeddings, which collapses to one layer); embedding size
18 instead of 5, to match APEM's d_f. Defaults otherwise as the official code: towers [128, 64, 32],
dropout [0.1, 0.3, 0.3], calibrator weight 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from apem.models.base import EmbeddingConfig, ModelOutput, MultiTaskModel
from apem.models.registry import register_model
from apem.nn.layers import MLP


def behavioral_expectation_calibrator(probs: torch.Tensor) -> torch.Tensor:
    """AITM's calibrator: mean over rows of sum_{t>=2} max(y_t - y_{t-1}, 0); zero for monotone outputs."""
    return torch.relu(probs[:, 1:] - probs[:, :-1]).sum(dim=1).mean()


class InformationTransferAttention(nn.Module):
    """AIT module: attention over {q_t, p_{t-1}} with Q.K scores; (B, k), (B, k) -> (B, k)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, std=0.01)  # the official initialisation
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, tower: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
        inputs = torch.stack([tower, transfer], dim=1)  # (B, 2, k)
        scores = (self.query(inputs) * self.key(inputs)).sum(-1) * self.scale
        weights = torch.softmax(scores, dim=1)
        return (weights.unsqueeze(-1) * self.value(inputs)).sum(dim=1)


@dataclass
class AITMConfig(EmbeddingConfig):
    tower_hidden: tuple[int, ...] = (128, 64, 32)
    dropout: tuple[float, ...] = (0.1, 0.3, 0.3)
    calibrator_weight: float = 0.3


@register_model("aitm")
class AITM(MultiTaskModel):
    """Not a :class:`TowerModel`: task t's tower output feeds task t+1 through the AIT module."""

    name = "AITM"
    Config = AITMConfig

    def build(self) -> None:
        cfg = self.config
        if len(cfg.dropout) != len(cfg.tower_hidden):
            raise ValueError("AITM: dropout needs one value per tower layer")
        self.towers = nn.ModuleList(self._tower(self.flat_dim) for _ in range(self.n_tasks))
        dim = cfg.tower_hidden[-1]
        self.transfers = nn.ModuleList(MLP(dim, [dim], dropout=cfg.dropout[-1]) for _ in range(self.n_tasks - 1))
        self.attention = InformationTransferAttention(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(self.n_tasks))

    def _tower(self, in_dim: int) -> nn.Sequential:
        layers = []
        for size, rate in zip(self.config.tower_hidden, self.config.dropout):
            layers.append(MLP(in_dim, [size], dropout=rate))
            in_dim = size
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        inputs = self.embedding(x).flatten(1)
        info = self.towers[0](inputs)
        logits = [self.heads[0](info)]
        for t in range(1, self.n_tasks):
            info = self.attention(self.towers[t](inputs), self.transfers[t - 1](info))
            logits.append(self.heads[t](info))
        return ModelOutput(probs=torch.sigmoid(torch.cat(logits, dim=1)))

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = super().loss(output, labels)
        calibrator = behavioral_expectation_calibrator(output.probs)
        total = total + self.config.calibrator_weight * calibrator
        return total, {**parts, "calibrator": calibrator.detach(), "total": total.detach()}
