"""The model contract every model (APEM, baselines, ablations) follows, and the one shared skeleton.

- Input: ``x``, a LongTensor (B, F) of per-field indices produced by :mod:`apem.data.encoding`.
- ``forward`` returns a :class:`ModelOutput` whose ``probs`` are the entire-space probabilities
  P(T_i=1|X), shape (B, N), in the spec's funnel order.
- ``loss`` returns the training objective and its named parts. Models with their own structure
  (ESMM's product, AITM's calibrator, ESCM2's propensity) put what they need in ``ModelOutput.aux``
  and override ``loss``; the trainer never branches on the model type.
- ``set_training_progress(step, total_steps)`` is called by the trainer before every optimisation
  step; models with schedules (APEM's dynamic activation) use it, others ignore it.
  ``schedule_settled()`` tells the trainer whether that schedule has reached its final regime, and
  ``inference_module()`` may return a faster equivalent for prediction (both default to trivial).

The skeleton: :class:`MultiTaskModel` owns the field embedding H (B, F, d) and the typed config;
a subclass builds its layers in ``build()``. :class:`TowerModel` adds the part every baseline
shares: per-task inputs (B, N, in) -> batched task towers -> logits (B, N) -> probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn

from apem.data.encoding import FieldSpec
from apem.nn.layers import FieldEmbedding, TaskTowers
from apem.nn.losses import LossConfig, sequential_dependence_loss


@dataclass
class ModelOutput:
    probs: torch.Tensor  # (B, N) entire-space probabilities in funnel order
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def float(self) -> "ModelOutput":
        """Every tensor as float32: losses run in float32 after a bf16-autocast forward."""
        return ModelOutput(probs=self.probs.float(), aux={k: v.float() for k, v in self.aux.items()})


@dataclass
class EmbeddingConfig:
    """What every model's config has: the field embedding size (Table 2's d_f)."""

    embed_dim: int = 18


class MultiTaskModel(nn.Module):
    """Base class: subclasses set ``name`` and ``Config`` (a dataclass extending
    :class:`EmbeddingConfig`) and build their layers in :meth:`build`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmbeddingConfig
    embedding_copies: ClassVar[int] = 1  # Single-Task gives each task its own embedding

    @classmethod
    def default_loss_config(cls) -> LossConfig:
        """Baselines train on L_M alone (sigma = 0); APEM overrides this to switch on L_D."""
        return LossConfig()

    def __init__(self, fields: Sequence[FieldSpec], n_tasks: int, config=None,
                 loss_config: LossConfig | None = None, *, registry_name: str = "") -> None:
        super().__init__()
        if n_tasks < 2:
            raise ValueError(f"a funnel needs 2 or more steps, got {n_tasks}")
        self.config = config if config is not None else self.Config()
        self.loss_config = loss_config or self.default_loss_config()
        self.registry_name = registry_name or self.name
        self.fields = list(fields)
        self.n_tasks = n_tasks
        self.embedding = FieldEmbedding(self.fields, self.config.embed_dim * self.embedding_copies)
        self.flat_dim = len(self.fields) * self.config.embed_dim  # F d: one flattened H
        self.build()

    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_training_progress(self, step: int, total_steps: int | None = None) -> None:
        """Hook called by the trainer before each optimisation step; default: nothing."""

    def schedule_settled(self) -> bool:
        """Whether the model's training schedule has reached its final regime (APEM: gamma at its
        floor, f_D binary). The trainer only lets epochs that end settled become the best epoch;
        default: always settled."""
        return True

    def inference_module(self, rows: int | None = None) -> nn.Module:
        """A module computing the same ``forward`` faster for eval-mode prediction of ``rows`` rows
        (when known) with frozen weights, built once per :func:`apem.inference.predict.predict`
        call; default: the model itself."""
        return self

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its named parts, detached 0-dim tensors (read once per epoch by the trainer)."""
        return sequential_dependence_loss(output.probs, labels, self.loss_config)


class TowerModel(MultiTaskModel):
    """embed -> :meth:`task_inputs` (B, N, in) -> one batched tower per task -> :meth:`output`.

    Subclasses set ``self.towers`` (:meth:`make_towers`) in ``build`` and implement ``task_inputs``.
    """

    def make_towers(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, count: int | None = None
                    ) -> TaskTowers:
        return TaskTowers(self.n_tasks if count is None else count, in_dim, hidden, dropout=dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """H (B, F, d * embedding_copies) -> per-task tower inputs (B, N, in)."""
        raise NotImplementedError

    def output(self, logits: torch.Tensor) -> ModelOutput:
        """Logits (B, N) -> entire-space probabilities; chained models override this."""
        return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.output(self.towers(self.task_inputs(self.embedding(x))))

    def shared_input(self, h: torch.Tensor) -> torch.Tensor:
        """The same flattened H (B, F d) for every task, as (B, N, F d) without a copy."""
        return h.flatten(1).unsqueeze(1).expand(-1, self.n_tasks, -1)
