import numpy as np
import pytest
from scipy.stats import norm

from apem.eval.metrics import auc
from apem.eval.significance import (
    _SortedAUC,
    delong_covariance,
    delong_test,
    delong_vs_chance,
    paired_bootstrap,
    stratified_counts,
)


def mann_whitney_reference(labels, scores):
    """DeLong et al. (1988) written literally: the O(m n) kernel psi and its structural apem_kfp.components."""
    labels = np.asarray(labels, dtype=bool)
    k = len(scores)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, y = s[labels], s[~labels]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    v10, v01 = np.array(v10), np.array(v01)
    m, n = labels.sum(), (~labels).sum()
    cov = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            cov[r, s] = ((v10[r] - aucs[r]) @ (v10[s] - aucs[s])) / (m - 1) / m \
                + ((v01[r] - aucs[r]) @ (v01[s] - aucs[s])) / (n - 1) / n
    return np.array(aucs), cov


def correlated_scores(rows, seed, shift_b=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.random(rows) < 0.3
    shared = rng.normal(size=rows)
    a = labels * 1.0 + shared + 0.8 * rng.normal(size=rows)
    b = labels * (1.0 - shift_b) + shared + 0.8 * rng.normal(size=rows)
    return labels, a, b


@pytest.mark.parametrize("discrete", [False, True])
def test_delong_matches_literal_mann_whitney_components(discrete):
    labels, a, b = correlated_scores(300, seed=1)
    if discrete:  # many ties: psi = 1/2 paths must agree
        a, b = np.round(a), np.round(b * 2) / 2
    aucs, cov = delong_covariance(labels, np.vstack([a, b]))
    ref_aucs, ref_cov = mann_whitney_reference(labels, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9)
    assert aucs[0] == pytest.approx(auc(labels, a))

    test = delong_test(labels, a, b)
    z_ref = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert test.z == pytest.approx(z_ref)
    assert test.p_two_sided == pytest.approx(2 * norm.sf(abs(z_ref)))
    assert test.p_worse + test.p_better == pytest.approx(1.0)


def test_delong_variance_agrees_with_paired_bootstrap():
    labels, a, b = correlated_scores(4000, seed=2, shift_b=0.1)
    delong = delong_test(labels, a, b)
    boot = paired_bootstrap(labels, a, b, resamples=800, seed=3)
    assert boot.test.delta == pytest.approx(delong.delta)
    # 800 resamples estimate a standard error to about +-5%; 15% leaves room for that noise
    assert boot.test.se == pytest.approx(delong.se, rel=0.15)
    assert boot.percentile_low < delong.delta < boot.percentile_high
    assert (boot.test.p_better < 0.05) == (delong.p_better < 0.05)


def test_resampled_auc_without_resorting_equals_direct_auc():
    labels, a, _ = correlated_scores(500, seed=4)
    a = np.round(a, 1)  # ties
    counts = stratified_counts(labels, 5, np.random.default_rng(0))
    fast = _SortedAUC(labels, a)(counts)
    for row, value in zip(counts, fast):
        idx = np.repeat(np.arange(labels.size), row.astype(int))
        assert value == pytest.approx(auc(labels[idx], a[idx]))
    assert _SortedAUC(labels, a)(np.ones((1, labels.size)))[0] == pytest.approx(auc(labels, a))
    # stratified: class sizes are preserved in every resample
    assert (counts[:, labels].sum(axis=1) == labels.sum()).all()


def test_significance_direction_and_identical_models():
    labels, a, b = correlated_scores(3000, seed=5, shift_b=0.6)
    better = delong_test(labels, a, b)
    assert better.delta > 0 and better.p_better < 1e-3 and better.p_worse > 0.99
    worse = delong_test(labels, b, a)
    assert worse.p_worse == pytest.approx(better.p_better)
    same = delong_test(labels, a, a)
    assert same.delta == 0 and same.p_two_sided == 1.0


def test_vs_chance():
    labels, a, _ = correlated_scores(2000, seed=6)
    assert delong_vs_chance(labels, a).p_better < 1e-6
    noise = np.random.default_rng(7).normal(size=labels.size)
    assert delong_vs_chance(labels, noise).p_better > 0.01


def test_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.zeros(10), np.arange(10), np.arange(10))
