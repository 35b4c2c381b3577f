"""PLE baseline: Progressive Layered Extraction (Tang et al., RecSys 2020).

A stack of ``n_levels`` CGC (Customized Gate Control) layers. At level k each task i owns
``n_specific_experts`` experts and all tasks share ``n_shared_experts`` experts:

- task i's gate mixes only [task i's experts, shared experts] (PLE eq. 2-4), so another task's
  specific experts can never be selected by it;
- the shared gate mixes all experts and feeds the next level's shared experts (progressive
  extraction, PLE eq. 5); the last level has no shared gate;
- level k's task-i experts read task i's level k-1 output; level 1 reads the field embeddings.

One tower per task on the last level gives the entire-space P(T_i = 1 | X).

Departure: the PLE paper tunes expert counts and sizes per dataset; the defaults here are 2 levels of
1 specific + 1 shared expert of [256, 128] with towers [64] (Shared-Bottom's sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.models.base import EmbeddingConfig, TowerModel
from apem.models.experts import ExpertGroup, gated_mixture
from apem.models.registry import register_model


class CGCLayer(nn.Module):
    """One extraction level: (task inputs [N x (B, in)], shared input (B, in)) -> same at out_dim."""

    def __init__(self, in_dim: int, n_tasks: int, n_specific: int, n_shared: int, hidden: tuple[int, ...],
                 dropout: float, with_shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(ExpertGroup(in_dim, n_specific, hidden, dropout) for _ in range(n_tasks))
        self.shared_experts = ExpertGroup(in_dim, n_shared, hidden, dropout)
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, n_specific + n_shared) for _ in range(n_tasks))
        self.shared_gate = nn.Linear(in_dim, n_tasks * n_specific + n_shared) if with_shared_gate else None
        self.out_dim = self.shared_experts.out_dim

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared = self.shared_experts(shared_input)
        specific = [experts(inp) for experts, inp in zip(self.task_experts, task_inputs)]
        task_outputs = [gated_mixture(gate(inp), torch.cat([own, shared], dim=1))
                        for gate, inp, own in zip(self.task_gates, task_inputs, specific)]
        shared_output = None
        if self.shared_gate is not None:
            shared_output = gated_mixture(self.shared_gate(shared_input), torch.cat([*specific, shared], dim=1))
        return task_outputs, shared_output


@dataclass
class PLEConfig(EmbeddingConfig):
    n_levels: int = 2
    n_specific_experts: int = 1
    n_shared_experts: int = 1
    expert_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0


@register_model("ple")
class PLE(TowerModel):
    name = "PLE"
    Config = PLEConfig

    def build(self) -> None:
        cfg = self.config
        if cfg.n_levels < 1 or cfg.n_specific_experts < 1 or cfg.n_shared_experts < 1:
            raise ValueError("PLE needs n_levels, n_specific_experts and n_shared_experts >= 1")
        levels, in_dim = [], self.flat_dim
        for level in range(cfg.n_levels):
            layer = CGCLayer(in_dim, self.n_tasks, cfg.n_specific_experts, cfg.n_shared_experts, cfg.expert_hidden,
                             cfg.dropout, with_shared_gate=level < cfg.n_levels - 1)
            levels.append(layer)
            in_dim = layer.out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = self.make_towers(in_dim, cfg.tower_hidden, cfg.dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:
        shared = h.flatten(1)
        task_inputs = [shared] * self.n_tasks
        for level in self.levels:
            task_inputs, shared = level(task_inputs, shared)
        return torch.stack(task_inputs, dim=1)  # (B, N, D)
