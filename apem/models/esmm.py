"""ESMM baseline: Entire Space Multi-task Model (Ma et al., SIGIR 2018).

ESMM is defined for two steps: a CTR head and a CVR head on one shared embedding, with
pCTCVR = pCTR x pCVR (ESMM eq. 2) and the loss on the entire space only:
BCE(pCTR, click) + BCE(pCTCVR, click & convert) (ESMM eq. 3). The CVR head is never supervised
directly, which is how ESMM avoids the sample-selection bias of training CVR on clicked rows.

Generalisation to N >= 2 funnel steps: a chain of conditional heads. Head 1 gives P(T_1 = 1 | X); head
i >= 2 gives the conditional c_i = P(T_i = 1 | T_{i-1} = 1, X), and the entire-space output is
p_i = p_{i-1} x c_i. Every p_i is supervised on the entire space by the shared L_M (eq 20, sigma = 0),
which for N = 2 is exactly ESMM's loss. ``aux["conditional"]`` holds (c_1 = p_1, c_2, ..., c_N).

Defaults from the ESMM paper: embedding 18, towers [360, 200, 80].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.layers import MLP, FieldEmbedding
from apem.models.base import FieldSpec, LossConfig, ModelOutput, MultiTaskModel


def chain_probabilities(conditional: torch.Tensor) -> torch.Tensor:
    """ESMM eq. 2 over N steps: p_i = prod_{j<=i} c_j, (B, N) conditionals -> (B, N) entire-space probs."""
    return torch.cumprod(conditional, dim=1)


@dataclass
class ESMMConfig:
    embed_dim: int = 18
    tower_hidden: tuple[int, ...] = (360, 200, 80)
    dropout: float = 0.0


class ESMM(MultiTaskModel):
    name = "ESMM"
    Config = ESMMConfig

    def __init__(self, fields: list[FieldSpec], n_tasks: int, config: ESMMConfig | None = None,
                 loss_config: LossConfig | None = None) -> None:
        super().__init__(fields, n_tasks, config, loss_config)
        cfg = self.config
        self.embedding = FieldEmbedding(fields, cfg.embed_dim)
        self.in_dim = len(fields) * cfg.embed_dim
        self.towers = nn.ModuleList(self.tower() for _ in range(n_tasks))

    def tower(self) -> MLP:
        return MLP(self.in_dim, self.config.tower_hidden, out_dim=1, dropout=self.config.dropout)

    def conditional_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(inputs) for tower in self.towers], dim=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        inputs = self.embedding(x).flatten(1)
        conditional = torch.sigmoid(self.conditional_logits(inputs))
        return ModelOutput(probs=chain_probabilities(conditional), aux={"conditional": conditional})
