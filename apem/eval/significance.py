"""Significance tests for AUCs: DeLong's test for paired (correlated) AUCs and the paired bootstrap.

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of AUCs computed on the *same* rows
from the structural components of the Mann-Whitney statistic:

    V10_k(i) = mean over negatives j of psi(x_k(i), y_k(j))     (one value per positive i)
    V01_k(j) = mean over positives i of psi(x_k(i), y_k(j))     (one value per negative j)
    psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise
    S = cov(V10) / m + cov(V01) / n                              (m positives, n negatives)

and the difference of two AUCs is tested with z = (A_1 - A_2) / sqrt(S_11 + S_22 - 2 S_12).
The components are computed with midranks (Sun & Xu 2014), O(N log N), not the O(m n) kernel.

The bootstrap cross-check resamples positives and negatives separately (stratified, so every
resample has both classes) and applies the *same* resample to both models, which keeps the
pairing. Each resample's AUC is computed without re-sorting, from the sort order of the full data
and the resample's row counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, rankdata

from apem.eval.metrics import auc


def _two_classes(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(bool).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(
            f"AUC significance needs both classes; got {n_pos} positives out of {labels.size} rows"
        )
    return labels


def delong_components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Structural components of DeLong et al. (1988) for one or more score vectors on the same rows.

    ``scores`` is (rows,) or (models, rows). Returns (aucs (models,), v10 (models, positives),
    v01 (models, negatives)), computed from midranks as in Sun & Xu (2014):
    V10(i) = (R(i) - R_pos(i)) / n and V01(j) = 1 - (R(j) - R_neg(j)) / m, where R is the midrank
    among all rows and R_pos / R_neg the midrank among positives / negatives only.
    """
    labels = _two_classes(labels)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != labels.size:
        raise ValueError(f"scores have {scores.shape[1]} rows but labels have {labels.size}")
    m, n = int(labels.sum()), int((~labels).sum())
    pos, neg = scores[:, labels], scores[:, ~labels]
    rank_all = np.vstack([rankdata(row) for row in scores])
    rank_pos = np.vstack([rankdata(row) for row in pos])
    rank_neg = np.vstack([rankdata(row) for row in neg])
    v10 = (rank_all[:, labels] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, ~labels] - rank_neg) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix S = cov(V10)/m + cov(V01)/n for (models, rows) scores."""
    aucs, v10, v01 = delong_components(labels, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


@dataclass(frozen=True)
class PairedTest:
    """Candidate (a) against reference (b) on the same rows; delta = auc_a - auc_b.

    ``p_worse`` is the one-sided p-value of H1: auc_a < auc_b; ``p_better`` of H1: auc_a > auc_b;
    ``p_two_sided`` of H1: auc_a != auc_b.
    """

    method: str
    auc_a: float
    auc_b: float
    delta: float
    se: float
    z: float
    p_two_sided: float
    p_worse: float
    p_better: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def _normal_test(method: str, auc_a: float, auc_b: float, variance: float, confidence: float) -> PairedTest:
    delta = auc_a - auc_b
    se = math.sqrt(max(variance, 0.0))
    half = norm.ppf(0.5 + confidence / 2) * se
    if se == 0.0:
        # identical rankings (or a degenerate sample): no evidence either way unless delta != 0
        z = 0.0 if delta == 0 else math.copysign(math.inf, delta)
    else:
        z = delta / se
    return PairedTest(
        method=method, auc_a=float(auc_a), auc_b=float(auc_b), delta=float(delta), se=se, z=float(z),
        p_two_sided=float(2 * norm.sf(abs(z))), p_worse=float(norm.cdf(z)), p_better=float(norm.sf(z)),
        ci_low=float(delta - half), ci_high=float(delta + half),
    )


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                confidence: float = 0.95) -> PairedTest:
    """DeLong's test of two correlated AUCs on the same rows: z = (A_a - A_b) / sqrt(S_aa + S_bb - 2 S_ab)."""
    aucs, cov = delong_covariance(labels, np.vstack([np.ravel(scores_a), np.ravel(scores_b)]))
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return _normal_test("delong", aucs[0], aucs[1], variance, confidence)


def delong_vs_chance(labels: np.ndarray, scores: np.ndarray, confidence: float = 0.95) -> PairedTest:
    """One model against the chance level AUC = 0.5, with DeLong's variance of its AUC.

    A constant scorer has AUC 0.5 and zero variance, so this is the paired test against it.
    """
    aucs, cov = delong_covariance(labels, np.ravel(scores)[None, :])
    return _normal_test("delong", aucs[0], 0.5, cov[0, 0], confidence)


class _SortedAUC:
    """AUCs of row-weighted resamples of one score vector, without re-sorting per resample.

    The rows are sorted by score once. For a resample with row counts w, each positive i adds
    w_i * (Wneg below its score + Wneg tied with it / 2), read off one running sum of the negative
    counts in sorted order; AUC = that total / (sum Wpos * sum Wneg), ties counted half.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        scores = np.asarray(scores, dtype=np.float64)
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        is_pos = np.asarray(labels, dtype=bool)[self.order]
        new_group = np.r_[True, ordered[1:] != ordered[:-1]]
        group_start = np.flatnonzero(new_group)
        group = np.cumsum(new_group) - 1
        group_end = np.r_[group_start[1:], ordered.size]  # exclusive
        self.is_neg = (~is_pos).astype(np.int32)
        self.positives = np.flatnonzero(is_pos)
        self.tie_start = group_start[group[self.positives]]
        self.tie_end = group_end[group[self.positives]]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        ordered = counts[:, self.order]
        running = np.zeros((counts.shape[0], counts.shape[1] + 1), dtype=np.int64)
        np.cumsum(ordered * self.is_neg, axis=1, out=running[:, 1:])
        below = running[:, self.tie_start]
        tied = running[:, self.tie_end] - below
        pos = ordered[:, self.positives].astype(np.float64)
        numerator = (pos * (below + tied / 2)).sum(axis=1)
        return numerator / (pos.sum(axis=1) * running[:, -1])


@dataclass(frozen=True)
class BootstrapResult:
    test: PairedTest            # normal approximation with the bootstrap's standard error
    resamples: int
    percentile_low: float       # percentile interval of delta
    percentile_high: float
    share_worse: float          # share of resamples with delta < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "test": self.test.to_dict()}


def stratified_counts(labels: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Row counts (resamples, rows) of bootstrap resamples drawn within positives and negatives."""
    labels = np.asarray(labels, dtype=bool)
    rows = labels.size
    offsets = (np.arange(resamples) * rows)[:, None]
    counts = np.zeros(resamples * rows, dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(labels == cls)
        drawn = idx[rng.integers(0, idx.size, size=(resamples, idx.size))]
        counts += np.bincount((drawn + offsets).ravel(), minlength=resamples * rows)
    return counts.reshape(resamples, rows).astype(np.int32)


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     resamples: int = 500, seed: int = 0, confidence: float = 0.95,
                     chunk: int = 64) -> BootstrapResult:
    """Paired, class-stratified bootstrap of delta = AUC_a - AUC_b on the same rows.

    Both models are scored on the same resample. Its standard error feeds the same normal test as
    DeLong's, so the two p-values are directly comparable; the percentile interval is reported too.
    """
    labels = _two_classes(labels)
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    rng = np.random.default_rng(seed)
    auc_a, auc_b = _SortedAUC(labels, np.ravel(scores_a)), _SortedAUC(labels, np.ravel(scores_b))
    deltas = []
    for start in range(0, resamples, chunk):
        counts = stratified_counts(labels, min(chunk, resamples - start), rng)
        deltas.append(auc_a(counts) - auc_b(counts))
    deltas = np.concatenate(deltas)
    tail = (1 - confidence) / 2
    test = _normal_test("bootstrap", auc(labels, scores_a), auc(labels, scores_b),
                        float(np.var(deltas, ddof=1)), confidence)
    return BootstrapResult(
        test=test, resamples=resamples,
        percentile_low=float(np.quantile(deltas, tail)), percentile_high=float(np.quantile(deltas, 1 - tail)),
        share_worse=float(np.mean(deltas < 0)),
    )
