"""APEM: Adaptive Pattern Extraction Multi-task model (paper section 3, eq. 10-21).

Per sample, with field embeddings H (F x d_f), ``L`` stacked layers each run:

- ASRG (eq. 11-17): a selector z_K = f_D(MLP(H)) (eq. 11-13), a masked query Q_hat = I (.) z_K over
  learnable inducing points I (K x d_f) (eq. 14), multi-head attention of Q_hat over H W^K, H W^V
  (eq. 15) with output projection W^O (eq. 16), and Y_ASRG = LayerNorm(Q_hat + O) (eq. 17).
- Pattern Selector (eq. 18-19): per task i a learnable indicator alpha_i^k attends over Y_ASRG^k
  (same attention as eq. 15-16), and T_i^k = LayerNorm(T_i^{k-1} + F_i^k), with T_i^1 = LayerNorm(F_i^1).
- Towers: one MLP per task on T_i^L gives P(T_i = 1 | X) on the entire space (sigmoid, no product
  chain: the funnel order is learnt through L_D of eq. 21, see :mod:`apem.nn.losses`).

Readings chosen where the paper is ambiguous (all stated again where the code lives):

- eq. 11: z_K = MLP(flatten(H)), one selector MLP producing K values for each of the L layers.
- eq. 13: gamma(step) = max(gamma_start - gamma_decay * step, gamma_min), see :func:`apem.nn.layers.gamma_at`.
- eq. 17: "LayerNorm(O, H)" adds rows of different counts (K vs F); we follow Set Transformer's
  MAB, whose residual is the query: Y_ASRG = LayerNorm(Q_hat + O), K x d_f.
- Layer k+1's input: ``layer_input="fields"`` (default) lets every ASRG layer attend over the field
  embeddings H with its own selector and inducing points, so the hierarchy is carried by the
  Pattern Selector's residual chain T^{k-1} -> T^k (the paper stresses that PS messages do not pass
  into ASRG). ``layer_input="previous"`` instead lets layer k+1 attend over Y_ASRG^k (K rows).
  "fields" runs all layers as one batched einsum and is the faster one.
- Ablations (section 4.3): ``dynamic_activation=False`` ("w/o ASRG") replaces the selector and
  inducing points with plain stacked multi-head self-attention over the fields
  (Y^k = LayerNorm(X + MHA(X) W^O), X = H then Y^{k-1}); ``task_indicators=False`` ("w/o PS")
  replaces eq. 18's attention by a task-agnostic mean over Y^k's rows; "w/o L_D" is the loss
  config ``dependence_weights=0`` (registry names in :mod:`apem.models.ablations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.models.base import EmbeddingConfig, ModelOutput, MultiTaskModel
from apem.models.registry import register_model
from apem.nn.attention import InducingPointAttention, PatternSelector, multihead_attention
from apem.nn.layers import MLP, StackedLayerNorm, TaskTowers
from apem.nn.losses import LossConfig
from apem.nn.selection import dynamic_activation, gamma_at

LAYER_INPUTS = ("fields", "previous")


@dataclass
class APEMConfig(EmbeddingConfig):
    """Defaults from the paper's Table 2 (d_f = 18, M = 2, K = 64, L = 4) plus our readings."""

    heads: int = 2
    inducing_points: int = 64
    layers: int = 4
    selector_hidden: tuple[int, ...] = (64,)
    tower_hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    gamma_start: float = 10.0
    gamma_decay: float = 1e-2
    gamma_min: float = 1e-3
    layer_input: str = "fields"
    dynamic_activation: bool = True
    task_indicators: bool = True


@register_model("apem")
class APEM(MultiTaskModel):
    name = "apem"
    Config = APEMConfig

    @classmethod
    def default_loss_config(cls) -> LossConfig:
        """APEM trains with L_D on (eq. 21, sigma = 1, and eq. 23's w = 1)."""
        return LossConfig(task_weights=1.0, dependence_weights=1.0)

    def build(self) -> None:
        c = self.config
        if c.embed_dim % c.heads:
            raise ValueError(f"embed_dim {c.embed_dim} must be divisible by heads {c.heads}")
        if c.layer_input not in LAYER_INPUTS:
            raise ValueError(f"layer_input must be one of {LAYER_INPUTS}, got {c.layer_input!r}")
        if c.layers < 1 or c.inducing_points < 1:
            raise ValueError("layers and inducing_points must be >= 1")
        d, n_layers, k = c.embed_dim, c.layers, c.inducing_points
        if c.dynamic_activation:
            # eq. 11: transformation MLP from flattened H to K selector logits per layer
            self.selector = MLP(self.flat_dim, c.selector_hidden, out_dim=n_layers * k)
            self.asrg = InducingPointAttention(n_layers, k, d, c.heads)  # eq. 14-17
        else:  # "w/o ASRG": plain stacked self-attention, W^Q W^K W^V then W^O per layer
            self.attn_qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(n_layers))
            self.attn_out = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layers))
            self.attn_norm = StackedLayerNorm(n_layers, d)
        self.pattern_selector = PatternSelector(n_layers, self.n_tasks, d, c.heads, c.task_indicators)  # eq. 18-19
        self.towers = TaskTowers(self.n_tasks, d, c.tower_hidden, dropout=c.dropout)
        self.register_buffer("gamma", torch.tensor(float(c.gamma_start)))

    def set_training_progress(self, step: int, total_steps: int | None = None) -> None:
        """Anneal eq. 13's gamma; kept in a buffer so a saved model predicts with the gamma it was trained to."""
        c = self.config
        self.gamma.fill_(gamma_at(step, c.gamma_start, c.gamma_decay, c.gamma_min))

    def selector_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 11-12: z_K = f_D(MLP(flatten(H))) for every layer, (B, L, K); exact zeros where the mask is off."""
        c = self.config
        logits = self.selector(h.reshape(h.shape[0], -1))
        return dynamic_activation(logits, self.gamma).view(h.shape[0], c.layers, c.inducing_points)

    def shared_representation(self, h: torch.Tensor) -> torch.Tensor:
        """The stack of L shared outputs, (L, B, R, d): Y_ASRG^k (R = K), or self-attention outputs (R = F)."""
        c = self.config
        if not c.dynamic_activation:
            outputs, source = [], h
            for layer in range(c.layers):
                q, k, v = self.attn_qkv[layer](source).split(c.embed_dim, dim=-1)
                attended = self.attn_out[layer](multihead_attention(q, k, v, c.heads))
                source = self.attn_norm(source + attended, layer)
                outputs.append(source)
            return torch.stack(outputs)
        mask = self.selector_mask(h)
        if c.layer_input == "fields":  # every layer attends over H: one batched pass for all layers
            return self.asrg(h, mask)
        outputs, source = [], h
        for layer in range(c.layers):  # layer k+1 attends over Y_ASRG^k
            source = self.asrg(source, mask[:, layer:layer + 1], slice(layer, layer + 1))[0]
            outputs.append(source)
        return torch.stack(outputs)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = self.embedding(x)
        logits = self.towers(self.pattern_selector(self.shared_representation(h)))
        return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})

    @torch.no_grad()
    def selection_rates(self, x: torch.Tensor) -> torch.Tensor:
        """Share of non-zero entries of z_K per sample, averaged over layers (paper Fig. 7a), (B,)."""
        if not self.config.dynamic_activation:
            raise ValueError("selection rates need the dynamic activation layer (dynamic_activation=True)")
        return (self.selector_mask(self.embedding(x)) > 0).float().mean(dim=(1, 2))
