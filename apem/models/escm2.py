"""ESCM2 baseline: Entire Space Counterfactual Multi-task Model (Wang et al., SIGIR 2022).

ESMM's structure (:mod:`apem.models.esmm`: CTR head, conditional CVR head, pCTCVR = pCTR x pCVR, the
entire-space losses) plus a counterfactual regulariser on the CVR head, weighted by lambda_c
(``counterfactual_weight``):

- ``variant="ips"``: R_IPS = 1/|D| sum_{clicked} BCE(pCVR, convert) / o_hat (ESCM2 eq. for the IPS
  estimator), with the propensity o_hat = pCTR. The propensity is detached in the weight (the paper
  stops the gradient there) and clipped below at ``min_propensity`` to bound the variance.
- ``variant="dr"``: the doubly robust estimator of DR-JL (Wang et al. 2019) that ESCM2 adopts. An
  imputation head predicts the conversion label r~ on the entire space; the imputed error is
  e^ = BCE(pCVR, r~) and R_DR = 1/|D| sum_D [e^ + o (e - e^) / o_hat] (e = BCE(pCVR, convert), o =
  click). The imputation head is fitted with 1/|D| sum_D o (e - e^)^2 / o_hat; as in DR-JL's
  alternating scheme, each of the two terms only updates its own model (r~ is detached in R_DR, pCVR
  and e in the imputation loss). Propensity detached and clipped as for IPS.

Generalisation to N >= 2 steps: a chain of conditional heads as in ESMM. For conditional head i >= 2
the "clicked" rows are those with o_{i-1} = 1 (its local space) and the propensity is p_{i-1}, the
model's entire-space probability of reaching step i-1; the regulariser is summed over the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from apem.models.base import ModelOutput
from apem.models.esmm import ESMM, ESMMConfig
from apem.models.registry import register_model


def inverse_propensity_weight(propensity: torch.Tensor, min_propensity: float) -> torch.Tensor:
    """1 / clip(o_hat): detached, so no gradient flows into the propensity model through the weight."""
    return 1.0 / propensity.detach().clamp(min=min_propensity)


def ips_risk(conditional: torch.Tensor, observed: torch.Tensor, outcome: torch.Tensor,
             propensity: torch.Tensor, min_propensity: float) -> torch.Tensor:
    """ESCM2's IPS counterfactual risk: mean over the entire space of o * BCE(c, r) / o_hat."""
    error = F.binary_cross_entropy(conditional, outcome, reduction="none")
    return (observed * error * inverse_propensity_weight(propensity, min_propensity)).mean()


def doubly_robust_risk(conditional: torch.Tensor, imputed_label: torch.Tensor, observed: torch.Tensor,
                       outcome: torch.Tensor, propensity: torch.Tensor, min_propensity: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """ESCM2's DR risk (DR-JL): returns (R_DR for the prediction head, imputation loss for the imputation head)."""
    weight = inverse_propensity_weight(propensity, min_propensity)
    error = F.binary_cross_entropy(conditional, outcome, reduction="none")
    imputed_error = F.binary_cross_entropy(conditional, imputed_label.detach(), reduction="none")
    risk = (imputed_error + observed * (error - imputed_error) * weight).mean()
    imputation_error = F.binary_cross_entropy(conditional.detach(), imputed_label, reduction="none")
    imputation_loss = (observed * (error.detach() - imputation_error) ** 2 * weight).mean()
    return risk, imputation_loss


@dataclass
class ESCM2Config(ESMMConfig):
    variant: str = "ips"
    counterfactual_weight: float = 0.5
    min_propensity: float = 0.01


@register_model("escm2_dr", variant="dr")  # decorators apply bottom-up: ips is listed first
@register_model("escm2_ips", variant="ips")
class ESCM2(ESMM):
    name = "ESCM2"
    Config = ESCM2Config

    def build(self) -> None:
        super().build()
        cfg = self.config
        if cfg.variant not in ("ips", "dr"):
            raise ValueError(f"ESCM2 variant must be 'ips' or 'dr', got {cfg.variant!r}")
        self.name = f"ESCM2-{cfg.variant.upper()}"
        # DR: one imputation head per conditional head 2..N, on the same shared input
        self.imputation = (self.make_towers(self.flat_dim, cfg.tower_hidden, cfg.dropout, count=self.n_tasks - 1)
                           if cfg.variant == "dr" else None)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        shared = self.shared_input(self.embedding(x))
        output = self.output(self.towers(shared))
        if self.imputation is not None:
            output.aux["imputed_label"] = torch.sigmoid(self.imputation(shared[:, 1:]))
        return output

    def counterfactual_loss(self, output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The regulariser summed over conditional heads 2..N (plus, for DR, the imputation loss)."""
        conditional, cfg = output.aux["conditional"], self.config
        total = conditional.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for i in range(1, self.n_tasks):
            args = (labels[:, i - 1], labels[:, i], output.probs[:, i - 1], cfg.min_propensity)
            if self.imputation is None:
                risk = ips_risk(conditional[:, i], *args)
                total = total + risk
            else:
                risk, imputation = doubly_robust_risk(conditional[:, i], output.aux["imputed_label"][:, i - 1], *args)
                total = total + risk + imputation
                parts[f"imputation_{i}"] = imputation.detach()
            parts[f"counterfactual_{i}"] = risk.detach()
        return total, parts

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = super().loss(output, labels)
        counterfactual, cf_parts = self.counterfactual_loss(output, labels)
        total = total + self.config.counterfactual_weight * counterfactual
        return total, {**parts, **cf_parts, "total": total.detach()}
