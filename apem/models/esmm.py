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

from apem.models.base import EmbeddingConfig, ModelOutput, TowerModel
from apem.models.registry import register_model


def chain_probabilities(conditional: torch.Tensor) -> torch.Tensor:
    """ESMM eq. 2 over N steps: p_i = prod_{j<=i} c_j, (B, N) conditionals -> (B, N) entire-space probs."""
    return torch.cumprod(conditional, dim=1)


@dataclass
class ESMMConfig(EmbeddingConfig):
    tower_hidden: tuple[int, ...] = (360, 200, 80)
    dropout: float = 0.0


@register_model("esmm")
class ESMM(TowerModel):
    name = "ESMM"
    Config = ESMMConfig

    def build(self) -> None:
        self.towers = self.make_towers(self.flat_dim, self.config.tower_hidden, self.config.dropout)

    def task_inputs(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_input(h)

    def output(self, logits: torch.Tensor) -> ModelOutput:
        conditional = torch.sigmoid(logits)  # c_1 = p_1, c_i = P(T_i | T_{i-1}, X)
        return ModelOutput(probs=chain_probabilities(conditional), aux={"conditional": conditional})
