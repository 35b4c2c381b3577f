import math

import pytest
import torch

from apem.nn.losses import sequential_dependence_loss
from apem.nn.losses import LossConfig


def _bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_loss_matches_hand_computation():
    probs = torch.tensor([[0.8, 0.4, 0.1], [0.3, 0.2, 0.25]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    total, parts = sequential_dependence_loss(probs, labels, LossConfig(task_weights=[1.0, 2.0, 0.5],
                                                                        dependence_weights=[1.0, 3.0]))
    l_m = (1.0 * (_bce(0.8, 1) + _bce(0.3, 1)) / 2 + 2.0 * (_bce(0.4, 0) + _bce(0.2, 1)) / 2
           + 0.5 * (_bce(0.1, 0) + _bce(0.25, 1)) / 2)
    # eq. 23: mean over rows of ((f_{i-1} - f_i) - (o_{i-1} - o_i))^2
    d1 = ((0.4 - 1) ** 2 + (0.1 - 0) ** 2) / 2
    d2 = ((0.3 - 0) ** 2 + (-0.05 - 0) ** 2) / 2
    l_d = 1.0 * d1 + 3.0 * d2
    assert parts["l_m"] == pytest.approx(l_m, rel=1e-5)
    assert parts["l_d"] == pytest.approx(l_d, rel=1e-5)
    assert float(total) == pytest.approx(l_m + l_d, rel=1e-5) == pytest.approx(float(parts["total"]), rel=1e-6)


def test_zero_sigma_is_plain_multi_task_loss_and_gradients_flow():
    probs = torch.tensor([[0.6, 0.5], [0.2, 0.1]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    total, parts = sequential_dependence_loss(probs, labels, LossConfig())
    assert parts["l_d"] == 0.0
    total.backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()


def test_weight_lengths_are_checked():
    probs, labels = torch.full((2, 3), 0.5), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="task_weights needs 3"):
        sequential_dependence_loss(probs, labels, LossConfig(task_weights=[1.0, 1.0]))
    with pytest.raises(ValueError, match="dependence_weights needs 2"):
        sequential_dependence_loss(probs, labels, LossConfig(dependence_weights=[1.0]))
    with pytest.raises(ValueError, match="batch, steps"):
        sequential_dependence_loss(probs, torch.zeros(2, 2), LossConfig())


def test_a_loss_first_taken_in_inference_mode_still_trains_afterwards():
    """The loss weights are built once per device and kept: the first build may happen under inference mode
    (an evaluation), and the kept tensor must still be one autograd can save for a later backward."""
    config = LossConfig(task_weights=[1.0, 0.7, 0.3], dependence_weights=[0.9, 0.4])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    with torch.inference_mode():
        sequential_dependence_loss(torch.full((2, 3), 0.5), labels, config)
    logits = torch.zeros(2, 3, requires_grad=True)
    total, _ = sequential_dependence_loss(torch.sigmoid(logits), labels, config)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
