"""Small building blocks shared by all models: field embedding, MLP, batched task towers, stacked LayerNorm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apem.data.encoding import FieldSpec


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


class StackedLayerNorm(nn.Module):
    """LayerNorm over the last dim with separate affine parameters for each of ``L`` stacked layers."""

    def __init__(self, n_layers: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_layers, dim))
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.dim = dim

    def forward(self, x: torch.Tensor, layers: slice | int) -> torch.Tensor:
        """x: (L', ..., d) for the layers selected by a slice, or (..., d) for one layer index."""
        normed = torch.nn.functional.layer_norm(x, (self.dim,))
        w, b = self.weight[layers], self.bias[layers]
        if isinstance(layers, slice):
            shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
            w, b = w.view(shape), b.view(shape)
        return torch.addcmul(b, normed, w)  # one pass for the affine part


class TaskTowers(nn.Module):
    """One MLP tower per task, run as batched matmuls: (B, N, in) -> (B, N) logits."""

    def __init__(self, n_tasks: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = torch.empty(n_tasks, fan_in, fan_out)
            nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_tasks, 1, fan_out)))
        self.activation = activation()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)  # (N, B, in): one bmm per tower layer for all tasks
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.dropout(self.activation(h))
        return h.squeeze(-1).transpose(0, 1)
