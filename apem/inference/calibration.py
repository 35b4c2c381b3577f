"""Recalibration of predictions from a negatively-downsampled training set to the entire space."""

from __future__ import annotations

import numpy as np

from apem.data.split_record import check_negative_rate


def recalibrate(probs: np.ndarray, negative_rate: float) -> np.ndarray:
    """Map funnel probabilities learnt on downsampled data back to the entire space.

    Training kept rows whose first funnel step is 0 with rate R and every other row. For the first
    step this is the classic correction q_1 = p_1 / (p_1 + (1 - p_1) / R). Deeper steps are only
    reachable through the first, so the sampling leaves P(T_i=1 | T_1=1, X) = p_i / p_1 unchanged;
    hence q_i = q_1 * p_i / p_1, which keeps the funnel order q_1 >= q_2 >= ... whenever p does.
    ``probs`` is (rows, steps) in funnel order; R = 1 returns the input unchanged.
    """
    negative_rate = check_negative_rate(negative_rate)
    probs = np.asarray(probs, dtype=np.float64)
    if negative_rate == 1.0:
        return probs
    p1 = np.clip(probs[:, :1], 1e-12, 1.0)
    q1 = p1 / (p1 + (1.0 - p1) / negative_rate)
    return probs * (q1 / p1)
