"""Small building blocks shared by all models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apem.models.base import FieldSpec


class FieldEmbedding(nn.Module):
    """One embedding table for all fields, addressed by per-field offsets: (B, F) -> (B, F, dim)."""

    def __init__(self, fields: Sequence[FieldSpec], dim: int) -> None:
        super().__init__()
        cards = torch.tensor([f.cardinality for f in fields], dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(cards, 0) - cards, persistent=False)
        self.embedding = nn.Embedding(int(cards.sum()), dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.n_fields = len(fields)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x + self.offsets)


class MLP(nn.Module):
    """Linear -> activation (-> dropout) per hidden size; an optional final linear to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), activation()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = size
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
