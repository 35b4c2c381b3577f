"""The sequential-dependence multi-task loss (paper eq. 20-23)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    """Eq. 21's weights: ``task_weights`` (w) and ``dependence_weights`` (sigma), one float for every
    task / step pair, or a list with one value each (see :func:`sequential_dependence_loss`)."""

    task_weights: float | list[float] = 1.0
    dependence_weights: float | list[float] = 0.0


def per_step_weights(value: float | list[float], count: int, what: str) -> list[float]:
    """Expand a scalar weight to ``count`` copies, or check a list has exactly ``count`` entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{what} needs {count} value(s), got {len(values)}: {values}")
    return values


@functools.lru_cache(maxsize=64)
def _weights_on(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a tensor on ``device``, built once: a fresh copy from host memory every step would make
    a GPU wait until the step's kernels so far have finished (a blocking host-to-device copy). Built outside
    inference mode, so that a first call under it does not leave a tensor that autograd may not save."""
    with torch.inference_mode(False):
        return torch.tensor(values, device=device, dtype=dtype)


def sequential_dependence_loss(probs: torch.Tensor, labels: torch.Tensor,
                               config: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 21 with eq. 23's MSE: L = L_M + L_D on entire-space probabilities f_i = P(T_i = 1 | X).

    - L_M (eq. 20/21, first sum) = sum_i w_i * mean_j BCE(f_i(x_j), o_j^i)
    - L_D (eq. 21, second sum; eq. 23) = sum_{i>=2} sigma_{i-1} * mean_j (f_{i-1}(x_j) - f_i(x_j) - (o_j^{i-1} - o_j^i))^2

    Eq. 23's per-sample weight w is 1 (as in the paper). ``probs`` and ``labels`` are (B, N) in
    funnel order; w = ``config.task_weights`` (N values), sigma = ``config.dependence_weights``
    (N - 1 values). L_D is skipped (and reported as 0) when every sigma is 0.
    Returns the total and its parts ``l_m``, ``l_d``, ``total`` as detached 0-dim tensors: the trainer sums
    them over an epoch on the device and reads them once (a float per step would wait for the GPU each step).
    """
    if probs.shape != labels.shape or probs.dim() != 2:
        raise ValueError(f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} must both be (batch, steps)")
    n_tasks = probs.shape[1]
    w = per_step_weights(config.task_weights, n_tasks, "task_weights")
    sigma = per_step_weights(config.dependence_weights, n_tasks - 1, "dependence_weights")
    bce = F.binary_cross_entropy(probs, labels, reduction="none").mean(dim=0)
    l_m = (bce * _weights_on(tuple(w), probs.device, probs.dtype)).sum()
    if any(sigma):
        gaps = (probs[:, :-1] - probs[:, 1:]) - (labels[:, :-1] - labels[:, 1:])
        l_d = (gaps.square().mean(dim=0) * _weights_on(tuple(sigma), probs.device, probs.dtype)).sum()
    else:
        l_d = probs.new_zeros(())
    total = l_m + l_d
    return total, {"l_m": l_m.detach(), "l_d": l_d.detach(), "total": total.detach()}
