"""Small building blocks shared by all models: field embedding, MLP, batched task towers, stacked LayerNorm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from apem.data.encoding import DENSE_SCALE, FieldSpec
from apem.nn.native_pools import distinct_rows as native_distinct_rows
from apem.nn.native_pools import native_library


# distinct_rows flags the table's rows (one pass over them) instead of sorting the batch's entries while the table
# has at most this many rows per entry
DISTINCT_BY_FLAGS = 4


class FieldEmbedding(nn.Module):
    """One embedding table for all fields, addressed by per-field offsets: (B, F + D) -> (B, F, dim).

    The first F input columns are field indices. Fields marked ``dense`` (the ``dense_log``
    numerical encoding, :mod:`apem.data.encoding`) have one more column each, after the F indices,
    holding ``signed_log(x)`` in fixed point; such a field's embedding is its bucket's row plus
    ``signed_log(x) * v_f`` with a learnt vector ``v_f`` per field. Without dense fields the module
    has exactly the parameters it always had, so older model directories load unchanged.
    """

    def __init__(self, fields: Sequence[FieldSpec], dim: int) -> None:
        super().__init__()
        cards = torch.tensor([f.cardinality for f in fields], dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(cards, 0) - cards, persistent=False)
        self.embedding = nn.Embedding(int(cards.sum()), dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.field_names = [f.name for f in fields]
        self.n_fields = len(fields)
        self.dim = dim
        dense = [i for i, f in enumerate(fields) if getattr(f, "dense", False)]
        self.register_buffer("dense_positions", torch.tensor(dense, dtype=torch.long), persistent=False)
        # Small: |signed_log| reaches ~14 for balances, so std 0.01 starts the term at the rows' scale.
        self.dense_vectors = nn.Parameter(torch.randn(len(dense), dim) * 0.01) if dense else None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The looked-up table rows (B, F, dim) alone, without the dense term. Through index_select, the same rows as
        ``self.embedding``: on CPU its backward (index_add) measured ~3x faster than embedding's, whose sort of the
        indices made a Shared-Bottom training step ~6% slower (B = 1024, F = 16)."""
        ids = x[:, :self.n_fields] + self.offsets
        return torch.index_select(self.embedding.weight, 0, ids.reshape(-1)).view(*ids.shape, self.dim)

    def distinct_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's distinct table rows (U, dim) and where each field looks (B, F) into them, so
        that ``self(x) == rows[index]``; None with dense fields (their embedding is not a table row)."""
        if self.dense_vectors is not None:
            return None
        table_rows = self.embedding.num_embeddings
        # flags only on CPU, where they were measured (on a GPU both wait once for the count of distinct rows)
        flags = x.device.type == "cpu" and table_rows <= DISTINCT_BY_FLAGS * x.shape[0] * self.n_fields
        lib = native_library(self.embedding.weight) if flags and x.dtype == torch.int64 else None
        if lib is not None:  # the flags in C: ~0.25 ms a batch of 2048 through torch's ops
            distinct, index = native_distinct_rows(lib, x, self.offsets, table_rows)
            return torch.index_select(self.embedding.weight, 0, distinct), index
        ids = x[:, :self.n_fields] + self.offsets
        if not flags:
            distinct, index = torch.unique(ids, return_inverse=True)
        else:  # a flag per table row, then the running count of flags numbers the distinct rows in order:
            # torch.unique's result without its sort (~4x faster at batch 1024 on a table of 2k rows)
            if ids.numel() and int(ids.min()) < 0:  # a flag would wrap around to the table's last rows
                raise IndexError(f"an embedding lookup falls outside the table's {table_rows} rows")
            present = torch.zeros(table_rows, dtype=torch.bool, device=ids.device)
            present[ids.reshape(-1)] = True
            distinct, index = present.nonzero().view(-1), (torch.cumsum(present, 0) - 1)[ids]
        return torch.index_select(self.embedding.weight, 0, distinct), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rows(x)
        if self.dense_vectors is None:
            return h
        values = x[:, self.n_fields:].to(h.dtype) / DENSE_SCALE  # (B, D) signed_log(x)
        return h.index_add(1, self.dense_positions, values.unsqueeze(-1) * self.dense_vectors)

    def field_weights(self, default: float, per_field: dict[str, float] | None = None) -> torch.Tensor:
        """(F,) regularisation coefficients: ``per_field[name]`` where given, else ``default``."""
        per_field = per_field or {}
        unknown = sorted(set(per_field) - set(self.field_names))
        if unknown:
            raise ValueError(f"embedding regularisation names unknown field(s) {unknown}; "
                             f"fields are {self.field_names}")
        return torch.tensor([float(per_field.get(n, default)) for n in self.field_names])

    def row_penalty(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-field weight decay on the rows a batch uses: mean over rows of sum_f w_f ||e_f(x)||^2.

        Decaying only the rows looked up (rather than the whole table each step) is the usual
        reading for sparse embeddings: a user row seen once a week is not shrunk on every step.
        """
        squared = self.rows(x).square().sum(-1)  # (B, F)
        return (squared * weights.to(squared.device)).sum(1).mean()

    def field_row_norms(self) -> dict[str, float]:
        """Mean L2 norm of each field's rows: what the regularisation does, reported per epoch."""
        norms = self.embedding.weight.detach().norm(dim=1)
        bounds = self.offsets.tolist() + [norms.shape[0]]
        return {n: float(norms[a:b].mean()) for n, a, b in zip(self.field_names, bounds[:-1], bounds[1:])}


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


# Rows narrower than this are normalised by rowwise_layer_norm on a GPU (see layer_norm).
NARROW_ROW_WIDTH = 32


def rowwise_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    """LayerNorm over the last dim as two reductions and elementwise ops, in float32 (as autocast runs
    ``layer_norm``): (x - mean) / sqrt(biased var + eps) * weight + bias, the same as torch's to rounding."""
    x = x.float()
    centred = x - x.mean(dim=-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    if weight is None:
        return normed
    return torch.addcmul(bias, normed, weight) if bias is not None else normed * weight


def uses_rowwise_layer_norm(x: torch.Tensor) -> bool:
    """Whether :func:`layer_norm` takes :func:`rowwise_layer_norm` for ``x``: off the CPU, on narrow rows."""
    return x.device.type != "cpu" and x.shape[-1] < NARROW_ROW_WIDTH


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` with an optional affine (weight, bias of that width).

    On a GPU, torch's kernel is slow on narrow rows: for eq. 17's 1M rows of d = 18 per layer (batch 16384,
    K = 64) it measured 2.9 ms a call and 54% of an APEM training step on an H200
    (``benchmarks/bench_gpu.py --profile-steps``). Rows narrower than ``NARROW_ROW_WIDTH`` there go through
    :func:`rowwise_layer_norm`: forward and backward of 1M rows on the H200 (``benchmarks/bench_layer_norm.py``)
    measured torch / rowwise 1.73 at width 16, 4.13 at 18, and 0.94, 0.62, 0.40 at 32, 64, 128. On a CPU
    torch's fused kernel is the faster at every width."""
    if uses_rowwise_layer_norm(x):
        return rowwise_layer_norm(x, weight, bias, eps)
    return nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


class StackedLayerNorm(nn.Module):
    """LayerNorm over the last dim with separate affine parameters for each of ``L`` stacked layers."""

    def __init__(self, n_layers: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_layers, dim))
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.dim, self.eps = dim, 1e-5

    def forward(self, x: torch.Tensor, layers: slice | int) -> torch.Tensor:
        """x: (L', ..., d) for the layers selected by a slice, or (..., d) for one layer index."""
        if not isinstance(layers, slice):  # one layer: its affine inside the one native call
            return layer_norm(x, self.weight[layers], self.bias[layers], self.eps)
        normed = layer_norm(x, eps=self.eps)
        w, b = self.weight[layers], self.bias[layers]
        shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
        return torch.addcmul(b.view(shape), normed, w.view(shape))  # one pass for the affine part


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
