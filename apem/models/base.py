"""The model contract every model (APEM, baselines, ablations) follows.

- Input: ``x``, a LongTensor (batch, fields) of per-field indices produced by ``apem.features``
  (categorical vocabularies and log-round-discretized numericals share one index space per field).
- ``forward`` returns a :class:`ModelOutput` whose ``probs`` are the entire-space probabilities
  P(T_i=1|X), shape (batch, tasks), in the spec's funnel order.
- ``loss`` returns the training objective and its named parts. Models with their own structure
  (ESMM's product, AITM's calibrator, ESCM2's propensity) put what they need in ``ModelOutput.aux``
  and override ``loss``; the trainer never branches on the model type.
- ``set_training_progress(step)`` is called by the trainer before every optimisation step;
  models with schedules (APEM's dynamic activation) use it, others ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class FieldSpec:
    """One input field: its name and how many distinct indices it can take (OOV included)."""

    name: str
    cardinality: int


@dataclass
class ModelOutput:
    probs: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Eq. 21: L = sum_i w_i BCE(f_i, o_i) + sum_{i>=2} sigma_{i-1} MSE(f_{i-1} - f_i, o_{i-1} - o_i).

    ``task_weights`` (w) and ``dependence_weights`` (sigma): one float for every task / step pair,
    or a list with one value each.
    """

    task_weights: float | list[float] = 1.0
    dependence_weights: float | list[float] = 0.0


class MultiTaskModel(nn.Module):
    """Base class: subclasses set ``name`` and ``Config`` (a dataclass) and implement ``forward``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    registry_name: str = ""

    @classmethod
    def default_loss_config(cls) -> LossConfig:
        """Baselines train on L_M alone (sigma = 0); APEM overrides this to switch on L_D."""
        return LossConfig()

    def __init__(self, fields: list[FieldSpec], n_tasks: int, config=None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        if n_tasks < 2:
            raise ValueError(f"a funnel needs 2 or more steps, got {n_tasks}")
        self.fields = list(fields)
        self.n_tasks = n_tasks
        self.loss_config = loss_config or self.default_loss_config()

    def forward(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_training_progress(self, step: int) -> None:
        """Hook called by the trainer before each optimisation step; default: nothing."""

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        from apem.losses import sequential_dependence_loss

        return sequential_dependence_loss(output.probs, labels, self.loss_config)
