import pytest
import torch

from apem.nn.attention import weighted_softmax
from apem.nn.selection import gamma_at, gamma_planned


@pytest.mark.parametrize("total,fraction", [(1000, 0.5), (150, 0.5), (40, 0.25), (7, 1.0)])
def test_planned_gamma_reaches_the_floor_at_the_configured_fraction(total, fraction):
    floor_step = fraction * total
    schedule = [gamma_planned(step, total, 10.0, 1e-3, fraction) for step in range(total + 1)]
    assert schedule[0] == 10.0
    reached = [step for step, gamma in enumerate(schedule) if gamma == 1e-3]
    assert reached[0] == int(-(-floor_step // 1))  # the first step at or past fraction * total
    assert reached == list(range(reached[0], total + 1))  # and it stays there
    assert all(a > b for a, b in zip(schedule[:reached[0]], schedule[1:reached[0] + 1]))  # strictly falling before


def test_planned_gamma_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="fraction"):
        gamma_planned(0, 100, floor_fraction=0.0)


def test_fixed_rate_schedule_kept():
    assert gamma_at(0) == 10.0
    assert gamma_at(999) == pytest.approx(0.01)
    assert gamma_at(1000) == 1e-3


def test_weighted_softmax_drops_zero_weight_rows_and_matches_softmax_with_ones():
    scores = torch.randn(4, 6, 3)
    torch.testing.assert_close(weighted_softmax(scores, torch.ones(4, 6, 1), dim=1), torch.softmax(scores, dim=1))
    weights = torch.ones(4, 6, 1)
    weights[:, :2] = 0.0
    out = weighted_softmax(scores, weights, dim=1)
    assert (out[:, :2] == 0).all()
    torch.testing.assert_close(out[:, 2:], torch.softmax(scores[:, 2:], dim=1))
    assert (weighted_softmax(scores, torch.zeros(4, 6, 1), dim=1) == 0).all()  # nothing selected: empty, not NaN
