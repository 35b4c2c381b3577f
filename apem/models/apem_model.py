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
- eq. 13: ``gamma_schedule="planned"``: gamma falls linearly from gamma_start to gamma_min, reached at
  ``gamma_floor_fraction`` (default 1/2, as the paper) of the planned steps
  (:func:`apem.nn.selection.gamma_planned`, the default); ``"fixed_rate"``
  keeps max(gamma_start - gamma_decay * step, gamma_min) (:func:`apem.nn.selection.gamma_at`). :meth:`APEM.schedule_settled` tells the trainer when gamma
  is at its floor, so early stopping only restores a model trained with a sharp (binary) f_D.
- eq. 14 with z_k = 0, a de-selected inducing point (``deselected_point``):
  ``"uniform_attention"`` (default, the literal eq. 14): Q_hat_k = 0 gives all-zero scores, so the
  point attends uniformly and Y_k = LayerNorm(mean_s V_s W^O) still carries every field into eq. 18;
  ``"contributes_nothing"`` (the paper's "0 means not interacting"): the point is also removed from
  the Pattern Selector's attention (eq. 18 weights z_k e^{score} / sum_j z_j e^{score_j}), so no
  output depends on its row. With soft z during annealing this weighs points smoothly.
- eq. 17: "LayerNorm(O, H)" adds rows of different counts (K vs F); we follow Set Transformer's
  MAB, whose residual is the query: Y_ASRG = LayerNorm(Q_hat + O), K x d_f.
- Layer k+1's input: ``layer_input="fields"`` (default) lets every ASRG layer attend over the field
  embeddings H with its own selector and inducing points, so the hierarchy is carried by the
  Pattern Selector's residual chain T^{k-1} -> T^k (the paper stresses that PS messages do not pass
  into ASRG). ``layer_input="previous"`` instead lets layer k+1 attend over Y_ASRG^k (K rows).
  "fields" runs all layers as one batched einsum and is the faster one.
- Ablations (section 4.3): ``dynamic_activation=False`` ("w/o ASRG") replaces the selector and
  inducing points with plain multi-head self-attention over the fields, Y^k = LayerNorm(X + MHA(X) W^O)
  with the same ``layer_input`` stacking as APEM (default "fields": X = H for every layer;
  "previous": X = Y^{k-1}), so the ablation changes the ASRG part only; ``task_indicators=False`` ("w/o PS")
  replaces eq. 18's attention by a task-agnostic mean over Y^k's rows; "w/o L_D" is the loss
  config ``dependence_weights=0`` (registry names in :mod:`apem.models.ablations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apem.models.apem_folded import FoldedAPEM
from apem.models.base import EmbeddingConfig, ModelOutput, MultiTaskModel
from apem.models.registry import register_model
from apem.nn.attention import InducingPointAttention, PatternSelector, multihead_attention
from apem.nn.layers import MLP, StackedLayerNorm, TaskTowers
from apem.nn.losses import LossConfig
from apem.nn.native_pools import native_library
from apem.nn.selection import GAMMA_SCHEDULES, dynamic_activation, gamma_at, gamma_planned

LAYER_INPUTS = ("fields", "previous")
DESELECTED_POINT_READINGS = ("uniform_attention", "contributes_nothing")


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
    # "planned": floor at gamma_floor_fraction of the planned steps (the paper's reading). "fixed_rate"
    # (1e-2 per step) needs 1000 steps to anneal, more than most runs here have, so its f_D never selects;
    # validation evidence for the choice: docs/results/issue10-grid/
    gamma_schedule: str = "planned"
    gamma_floor_fraction: float = 0.5  # share of the planned steps at which gamma reaches gamma_min
    deselected_point: str = "uniform_attention"  # or "contributes_nothing", see the module docstring
    layer_input: str = "fields"
    # "fields" only: take the ASRG's score and value products once per distinct embedding row of the
    # batch (the same outputs to float rounding, ~1/16 of the rows at batch 1024); False: the direct path
    gather_fields: bool = True
    dynamic_activation: bool = True
    task_indicators: bool = True


@dataclass(frozen=True)
class InferenceWeights:
    """The products of APEM's weights that its kernel path reads per batch: eq. 14-16's folded factors
    (:meth:`apem.nn.attention.InducingPointAttention.folded_weights`), eq. 18's score factor and its
    W^V W^O blocks (:class:`apem.nn.attention.PatternSelector`)."""
    folded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    pattern_factor: torch.Tensor
    pattern_value_out: tuple[torch.Tensor, torch.Tensor]


@register_model("apem")
class APEM(MultiTaskModel):
    name = "apem"
    Config = APEMConfig
    # many small ops per batch: apem.inference.predict.predict_stream runs batches side by side on CPU
    parallel_batches = True

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
        if c.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {c.gamma_schedule!r}")
        if c.deselected_point not in DESELECTED_POINT_READINGS:
            raise ValueError(f"deselected_point must be one of {DESELECTED_POINT_READINGS}, got {c.deselected_point!r}")
        if c.deselected_point == "contributes_nothing" and c.layer_input != "fields":
            raise ValueError('deselected_point="contributes_nothing" needs layer_input="fields" '
                             "(with \"previous\", layer k+1 would still attend over the de-selected rows)")
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
        """Anneal eq. 13's gamma; kept in a buffer so a saved model predicts with the gamma it was trained to.

        Without a planned length (``total_steps`` None) the "planned" schedule falls back to the fixed rate.
        """
        c = self.config
        if c.gamma_schedule == "planned" and total_steps:
            gamma = gamma_planned(step, total_steps, c.gamma_start, c.gamma_min, c.gamma_floor_fraction)
        else:
            gamma = gamma_at(step, c.gamma_start, c.gamma_decay, c.gamma_min)
        self.gamma.fill_(gamma)

    def schedule_settled(self) -> bool:
        """True once gamma sits at its floor (f_D is binary); without the selector there is no schedule."""
        c = self.config
        return not c.dynamic_activation or float(self.gamma) <= c.gamma_min * (1 + 1e-6)  # float32 buffer

    def pattern_selector_weights(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Row weights for eq. 18 under the "contributes nothing" reading: z_K as (L, B, K); else None."""
        if mask is None or self.config.deselected_point != "contributes_nothing":
            return None
        return mask.transpose(0, 1)

    def selector_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 11: MLP(flatten(H)) for every layer, (B, L, K), the input of f_D."""
        c = self.config
        return self.selector(h.flatten(1)).view(h.shape[0], c.layers, c.inducing_points)

    def selector_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Eq. 11-12: z_K = f_D(MLP(flatten(H))) for every layer, (B, L, K); exact zeros where the mask is off."""
        return dynamic_activation(self.selector_logits(h), self.gamma)

    def shared_representation(self, h: torch.Tensor) -> torch.Tensor:
        """The stack of L shared outputs, (L, B, R, d): Y_ASRG^k (R = K), or self-attention outputs (R = F)."""
        c = self.config
        if not c.dynamic_activation:
            return self.self_attention_layers(h)
        return self.asrg_layers(h, self.selector_mask(h))

    def asrg_layers(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Y_ASRG^k for every layer (eq. 14-17), (L, B, K, d), given z_K (B, L, K)."""
        c = self.config
        if c.layer_input == "fields":  # every layer attends over H: one batched pass for all layers
            return self.asrg(h, mask)
        outputs, source = [], h
        for layer in range(c.layers):  # layer k+1 attends over Y_ASRG^k
            source = self.asrg(source, mask[:, layer:layer + 1], slice(layer, layer + 1))[0]
            outputs.append(source)
        return torch.stack(outputs)

    def self_attention_layers(self, h: torch.Tensor) -> torch.Tensor:
        """"w/o ASRG": Y^k = LayerNorm(X + MHA(X) W^O), X = H ("fields") or Y^{k-1} ("previous"), (L, B, F, d)."""
        c = self.config
        outputs, source = [], h
        for layer in range(c.layers):
            q, k, v = self.attn_qkv[layer](source).split(c.embed_dim, dim=-1)
            attended = self.attn_out[layer](multihead_attention(q, k, v, c.heads))
            out = self.attn_norm(source + attended, layer)
            outputs.append(out)
            source = h if c.layer_input == "fields" else out
        return torch.stack(outputs)

    def head(self, shared: torch.Tensor, mask: torch.Tensor | None) -> ModelOutput:
        """Pattern Selector (eq. 18-19) and towers on the shared stack (L, B, R, d)."""
        logits = self.towers(self.pattern_selector(shared, self.pattern_selector_weights(mask)))
        return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})

    def forward(self, x: torch.Tensor, weights: InferenceWeights | None = None) -> ModelOutput:
        """``weights``: :meth:`inference_weights`, held by :class:`KernelInference` for a whole prediction (else the
        kernel path takes them per batch)."""
        table = self.embedding.distinct_rows(x) if self.gathers_fields() else None
        if table is not None:  # every layer attends over H = rows[index]: products per distinct row
            rows, index = table
            # H = rows[index] through index_select: its backward (index_add) measured ~3x faster than embedding's
            h = rows.index_select(0, index.view(-1)).view(*index.shape, rows.shape[1])
            selector_logits = self.selector_logits(h)
            # the kernels' paths, each None where it does not apply: both run eq. 13-18 in one kernel per layer,
            # training over the points some row keeps (each would only build and drop its factors in the other mode)
            if torch.is_grad_enabled():
                pooled = self.kept_pattern_pool(rows, index, selector_logits)
            else:
                pooled = self.fused_pattern_pool(rows, index, selector_logits, weights)
            if pooled is not None:
                logits = self.towers(self.pattern_selector.from_pooled(
                    pooled, None if weights is None else weights.pattern_value_out))
                return ModelOutput(probs=torch.sigmoid(logits), aux={"logits": logits})
            mask = dynamic_activation(selector_logits, self.gamma)
            return self.head(self.asrg(rows, mask, index=index), mask)
        h = self.embedding(x)
        if not self.config.dynamic_activation:
            return self.head(self.self_attention_layers(h), None)
        mask = self.selector_mask(h)
        return self.head(self.asrg_layers(h, mask), mask)

    def fused_pattern_pool(self, rows: torch.Tensor, index: torch.Tensor, selector_logits: torch.Tensor,
                           weights: InferenceWeights | None = None) -> torch.Tensor | None:
        """Inference on CPU: eq. 13-18 in one C kernel that skips the points no row of the batch keeps
        (:meth:`apem.nn.attention.InducingPointAttention.fused_pattern_pool`), from H = rows[index] and eq. 11's
        logits (B, L, K); eq. 18's pooled rows (L B, N M, d), or None where it does not apply (gradients, no
        task indicators, no kernels)."""
        c = self.config
        if not c.task_indicators:
            return None
        # without held weights: eq. 18's score factor here, the ASRG's folded factors in the ASRG
        pattern_factor = self.pattern_selector.score_factor() if weights is None else weights.pattern_factor
        return self.asrg.fused_pattern_pool(rows, index, selector_logits, float(self.gamma), pattern_factor,
                                            uniform=c.deselected_point == "uniform_attention",
                                            folded=None if weights is None else weights.folded)

    def inference_weights(self) -> InferenceWeights:
        """The products of weights the kernel path reads (it needs task indicators)."""
        return InferenceWeights(self.asrg.folded_weights(), self.pattern_selector.score_factor(),
                                self.pattern_selector.attention.value_out(slice(None)))

    def kept_pattern_pool(self, rows: torch.Tensor, index: torch.Tensor,
                          selector_logits: torch.Tensor) -> torch.Tensor | None:
        """Training on CPU: eq. 13-18 in one C kernel per layer over only the points some row of the batch keeps
        (all of them while gamma anneals; :meth:`apem.nn.attention.InducingPointAttention.kept_pattern_pool`);
        eq. 18's pooled rows (L B, N M, d), or None where it does not apply (no task indicators, no kernels)."""
        c = self.config
        if not c.task_indicators:
            return None
        return self.asrg.kept_pattern_pool(rows, index, selector_logits, self.gamma,
                                           self.pattern_selector.score_factor(),
                                           uniform=c.deselected_point == "uniform_attention")

    def gathers_fields(self) -> bool:
        """Whether :meth:`forward` runs the ASRG over the batch's distinct embedding rows
        (:func:`apem.nn.attention.gathered_pool`); ``gather_fields=False`` keeps the direct path."""
        c = self.config
        # a traced graph (apem.inference.export) keeps the direct path, whose ops trace for any batch size
        return c.dynamic_activation and c.layer_input == "fields" and c.gather_fields and not torch.jit.is_tracing()

    def inference_module(self, rows: int | None = None) -> nn.Module:
        """Eval-mode prediction through :class:`FoldedAPEM` where it applies (the ASRG selector with
        the default ``layer_input="fields"``) and pays: its tables cost one product per embedding
        row, the direct path one per (row, field) of the input, so for fewer than
        (embedding rows / fields) input rows (e.g. a single serving request) the model itself is faster.
        Where the C kernels run this model (float32 on CPU, :mod:`apem.nn.native_pools`), the model itself
        predicts, through the fused inference kernel (:meth:`fused_pattern_pool`), with its weights' products
        taken once (:class:`KernelInference`): it measured 2.2-2.6x faster than the tables
        (``benchmarks/bench_speed_table.py``). On a GPU the model itself predicts too."""
        c = self.config
        if self.training or not c.dynamic_activation or c.layer_input != "fields":
            return self
        if self.gamma.device.type != "cpu":  # the tables serve CPUs: their data-dependent shapes (which points a
            return self  # chunk keeps) would make a GPU wait every chunk, where the model runs whole batches
        if self.embedding.dense_vectors is not None:  # dense_log: H depends on the value, not only the row
            return self
        if rows is not None and rows * len(self.fields) < self.embedding.embedding.num_embeddings:
            return self
        if self.gathers_fields() and native_library(self.embedding.embedding.weight) is not None:
            return KernelInference(self) if c.task_indicators else self
        return FoldedAPEM(self)

    def row_order(self, x: torch.Tensor) -> torch.Tensor | None:
        """The order in which :func:`apem.inference.predict.predict_stream` scores the rows x (n, F): sorted by the
        field of the most categories (a user id, say), so that each batch's rows share more embedding rows. The
        kernel path computes its per-batch tables once per distinct row and reads them per sample, so fewer and
        cache-resident rows pay (on the synthetic funnel, 60k rows, two trained models: predict 1.4% and 4-5%
        faster). A row's prediction does not depend on the others in its batch (to float rounding: 7e-8); None off
        the kernel path."""
        if not self.fields or not self.gathers_fields() or native_library(self.embedding.embedding.weight) is None:
            return None
        widest = max(range(len(self.fields)), key=lambda f: self.fields[f].cardinality)
        return torch.argsort(x[:, widest], stable=True)

    @torch.no_grad()
    def selection_rates(self, x: torch.Tensor) -> torch.Tensor:
        """Share of non-zero entries of z_K per sample, averaged over layers (paper Fig. 7a), (B,)."""
        if not self.config.dynamic_activation:
            raise ValueError("selection rates need the dynamic activation layer (dynamic_activation=True)")
        return (self.selector_mask(self.embedding(x)) > 0).float().mean(dim=(1, 2))


class KernelInference(nn.Module):
    """APEM's eval-mode prediction through its kernel path (:meth:`APEM.fused_pattern_pool`) with
    :meth:`APEM.inference_weights` taken once, where the model itself takes them per batch (~3% of a
    prediction at batch 2048). Built per prediction (:meth:`APEM.inference_module`): it holds the weights'
    values of that moment."""

    parallel_batches = True  # as APEM: many small ops per batch

    def __init__(self, model: APEM) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.weights = model.inference_weights()

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.model(x, weights=self.weights)

    def row_order(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.model.row_order(x)
