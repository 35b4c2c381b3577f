"""ASRG's selection (paper eq. 11-13): the dynamic activation f_D and the annealing of its gamma."""

from __future__ import annotations

import torch

GAMMA_SCHEDULES = ("planned", "fixed_rate")


def dynamic_activation(z: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Eq. 13, the dynamic activation f_D (a smooth-step, as in DSelect-k):

    f_D(z) = 0 for z <= -gamma/2, 1 for z >= gamma/2, and -2 z^3 / gamma^3 + 3 z / (2 gamma) + 1/2 between.

    Computed on u = clamp(z / gamma, -1/2, 1/2) as -2 u^3 + 3/2 u + 1/2, which is exact 0 / 1 at
    the ends (so the mask really is sparse) and stays finite for gamma as small as 1e-3.
    """
    u = torch.clamp(z / gamma, -0.5, 0.5)
    return 0.5 + u * (1.5 - 2.0 * u * u)


def deselected(logits: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Where f_D(logit) is exactly 0, as a boolean of the logits' shape: logit / gamma <= -1/2
    (:func:`dynamic_activation` clamps u there, and its derivative 3/2 - 6 u^2 is exactly 0 at u = -1/2 too); a
    NaN logit is not de-selected, so that it reaches the output."""
    return logits / gamma <= -0.5


def kept_by_batch(logits: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Which points some row of the batch keeps: f_D(logit) != 0 in at least one row of eq. 11's logits
    (B, ..., K), as a boolean (..., K) (:func:`deselected` by no row). One reduction over the batch (torch's
    boolean ``any`` measured ~5x slower)."""
    if logits.shape[0] == 0:  # an empty batch keeps nothing (amax has no identity to return)
        return logits.new_zeros(logits.shape[1:], dtype=torch.bool)
    return ~deselected(logits.amax(dim=0), gamma)


def gamma_at(step: int, start: float = 10.0, decay: float = 1e-2, minimum: float = 1e-3) -> float:
    """The fixed-rate annealing of eq. 13's gamma: gamma(step) = max(start - decay * step, minimum).

    The paper prints "Max{10 - 2e*step, 1e*3}" with about 1e6 training steps; we read it as
    max(10 - 2e-5 * step, 1e-3), a linear decay that reaches the floor halfway through training.
    This form ignores the run length (1e-2 per step needs 1000 steps whatever the data), so the
    default schedule is :func:`gamma_planned`; this one stays as ``gamma_schedule="fixed_rate"``.
    """
    return max(start - decay * step, minimum)


def gamma_planned(step: int, total_steps: int, start: float = 10.0, minimum: float = 1e-3,
                  floor_fraction: float = 0.5) -> float:
    """Eq. 13's gamma scheduled against the planned run: linear from ``start`` at step 0 down to
    ``minimum`` at step ``floor_fraction * total_steps``, then held there.

    The same reading of the paper's "Max{10 - 2e-5 step, 1e-3}" over ~1e6 steps as
    :func:`gamma_at` (floor reached at half of training, ``floor_fraction=0.5``), with the slope
    derived from the run's planned length instead of fixed.
    """
    if not 0.0 < floor_fraction <= 1.0:
        raise ValueError(f"gamma floor fraction must be in (0, 1], got {floor_fraction}")
    floor_step = max(floor_fraction * total_steps, 1.0)
    if step >= floor_step:  # exactly the floor, not the floor plus rounding
        return minimum
    return max(start - (start - minimum) * step / floor_step, minimum)
