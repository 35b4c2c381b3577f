import numpy as np
import pytest

from apem.eval.blessing import BlessingRule, decide
from apem.eval.significance import delong_test, delong_vs_chance

LABELS = ["click", "authorize", "convert"]


def scored(rows=3000, seed=0, strength=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(seed)
    labels = rng.random((rows, 3)) < [0.4, 0.3, 0.2]
    shared = rng.normal(size=(rows, 3))
    scores = labels * np.array(strength) + shared
    return labels, scores, shared


def vs_champion(labels, cand, champ):
    return {name: delong_test(labels[:, k], cand[:, k], champ[:, k]).to_dict() for k, name in enumerate(LABELS)}


def test_equal_models_are_blessed_and_every_task_gives_a_reason():
    labels, scores, _ = scored()
    decision = decide(LABELS, vs_champion(labels, scores, scores), BlessingRule(), has_champion=True)
    assert decision.blessed
    assert all(any(r.startswith(name) for r in decision.reasons) for name in LABELS)


def test_significantly_worse_task_blocks_even_if_primary_improves():
    labels, champ, noise = scored(seed=1)
    cand = champ.copy()
    cand[:, 0] = labels[:, 0] * 0.2 + noise[:, 0]      # click much worse
    cand[:, 2] = labels[:, 2] * 1.5 + noise[:, 2]      # convert better
    decision = decide(LABELS, vs_champion(labels, cand, champ), BlessingRule(), has_champion=True)
    assert not decision.blessed
    assert any("click: significantly worse" in r for r in decision.reasons)
    assert any("convert (primary): not worse" in r for r in decision.reasons)


def test_primary_worse_by_point_estimate_blocks_unless_tolerated():
    labels, champ, noise = scored(seed=2)
    cand = champ.copy()
    rng = np.random.default_rng(3)
    cand[:, 2] = champ[:, 2] + 0.05 * rng.normal(size=len(champ))  # tiny perturbation of convert
    tests = vs_champion(labels, cand, champ)
    delta = tests["convert"]["delta"]
    assert delta != 0 and tests["convert"]["p_worse"] > 0.05  # not significant either way
    decision = decide(LABELS, tests, BlessingRule(), has_champion=True)
    assert decision.blessed == (delta >= 0)
    tolerant = decide(LABELS, tests, BlessingRule(primary_tolerance=abs(delta)), has_champion=True)
    assert tolerant.blessed


def test_two_sided_is_stricter_than_one_sided():
    labels, champ, noise = scored(rows=2000, seed=4)
    cand = champ.copy()
    cand[:, 0] = labels[:, 0] * 0.9 + noise[:, 0]
    tests = vs_champion(labels, cand, champ)
    p = tests["click"]["p_worse"]
    rule_one = BlessingRule(alpha=min(0.99, 1.5 * p), primary_tolerance=1.0)
    rule_two = BlessingRule(alpha=min(0.99, 1.5 * p), two_sided=True, primary_tolerance=1.0)
    assert not decide(LABELS, tests, rule_one, True).blessed
    assert decide(LABELS, tests, rule_two, True).blessed


def test_first_model_must_beat_chance_on_every_task():
    labels, scores, noise = scored(seed=5)
    good = {n: delong_vs_chance(labels[:, k], scores[:, k]).to_dict() for k, n in enumerate(LABELS)}
    assert decide(LABELS, good, BlessingRule(), has_champion=False).blessed
    bad = dict(good, authorize=delong_vs_chance(labels[:, 1], noise[:, 1]).to_dict())
    decision = decide(LABELS, bad, BlessingRule(), has_champion=False)
    assert not decision.blessed and any("authorize: does not beat chance" in r for r in decision.reasons)
    high_bar = BlessingRule(chance_margin=0.49)
    assert not decide(LABELS, good, high_bar, has_champion=False).blessed


def test_missing_auc_blocks_with_reason():
    labels, scores, _ = scored(seed=6)
    tests = vs_champion(labels, scores, scores)
    tests["convert"] = dict(tests["convert"], auc_a=float("nan"))
    decision = decide(LABELS, tests, BlessingRule(), has_champion=True)
    assert not decision.blessed and any("could not be computed" in r for r in decision.reasons)


def test_rule_validation_and_round_trip():
    rule = BlessingRule.from_dict({"alpha": 0.01, "two_sided": True, "primary_task": "authorize"})
    assert BlessingRule.from_dict(rule.to_dict()) == rule
    assert rule.primary(LABELS) == "authorize" and BlessingRule().primary(LABELS) == "convert"
    with pytest.raises(ValueError, match="unknown key"):
        BlessingRule.from_dict({"alpah": 0.1})
    with pytest.raises(ValueError, match="alpha"):
        BlessingRule(alpha=0)
    with pytest.raises(ValueError, match="primary_task"):
        BlessingRule(primary_task="signup").primary(LABELS)
