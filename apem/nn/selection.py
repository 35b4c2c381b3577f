"""ASRG's selection (paper eq. 11-13): the dynamic activation f_D and the annealing of its gamma."""

from __future__ import annotations

import torch


def dynamic_activation(z: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """Eq. 13, the dynamic activation f_D (a smooth-step, as in DSelect-k):

    f_D(z) = 0 for z <= -gamma/2, 1 for z >= gamma/2, and -2 z^3 / gamma^3 + 3 z / (2 gamma) + 1/2 between.

    Computed on u = clamp(z / gamma, -1/2, 1/2) as -2 u^3 + 3/2 u + 1/2, which is exact 0 / 1 at
    the ends (so the mask really is sparse) and stays finite for gamma as small as 1e-3.
    """
    u = torch.clamp(z / gamma, -0.5, 0.5)
    return 0.5 + u * (1.5 - 2.0 * u * u)


def gamma_at(step: int, start: float = 10.0, decay: float = 1e-2, minimum: float = 1e-3) -> float:
    """The annealing of eq. 13's gamma: gamma(step) = max(start - decay * step, minimum).

    The paper prints "Max{10 - 2e*step, 1e*3}" with about 1e6 training steps; we read it as
    max(10 - 2e-5 * step, 1e-3), i.e. a linear decay from 10 that reaches the floor 1e-3 halfway
    through training. Our datasets train for thousands, not millions, of steps, so ``decay`` is a
    parameter; APEM's default (1e-2) reaches gamma = 2 after 800 steps and the floor after 1000,
    i.e. within the first epochs of a few hundred thousand rows, after which f_D is binary.
    """
    return max(start - decay * step, minimum)
