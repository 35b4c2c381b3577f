"""The attainable reference: "generator known, user vectors estimated".

The Bayes oracle (``oracle/truth.parquet``) uses every user's true taste vector, which no learner can
recover from the few rows a user has. This reference knows everything else about the generator
(offer vectors and quality, every coefficient, the impressions' numericals) and estimates each
user's vector from that user's *training* rows only: the MAP under the generator's own prior
N(0, USER_VECTOR_SD^2 I) with the logistic likelihood of every observed funnel step (click on
every row, authorize given click, convert given authorize; sparse2: convert given click).
Test-row probabilities then average over each user's Laplace posterior around the MAP (a Gaussian
with the inverse Hessian as covariance, fixed-seed draws): with about 30 rows a user's vector is
uncertain, and averaging ranks better than plugging in the MAP, whose AUCs are reported beside
(300k rows, seed 0: 0.7175 / 0.7713 / 0.7746 against the MAP plug-in's 0.7114 / 0.7643 / 0.7733).
A user without training rows keeps the prior.

Nothing of the generator is copied here: its draws are regenerated from ``oracle/generator.json``
(:func:`apem.research.synth.draw_latent`) and each step's logit comes from
:func:`apem.research.synth.step_logits`. Logits are affine in the two affinities and the affinities
are bilinear in (user vector, offer vector), so every step's logit is ``offset + slope . u``: the
offsets and slopes are read off the generator's own functions, and the posterior is log-concave,
so Newton's method finds the unique MAP. Deterministic: no random draws of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from apem.eval.metrics import auc
from apem.research.synth import (LATENT_DIM, USER_VECTOR_SD, Latent, SynthConfig, affinities,
                                 config_from_generator_record, draw_latent, step_logits)

ID_PREFIX = "imp"


@dataclass(frozen=True)
class CeilingConfig:
    max_newton_steps: int = 50
    tolerance: float = 1e-8  # largest change of any user-vector coordinate that counts as converged
    # the reported reference averages the probabilities over the Laplace posterior of each user's
    # vector (measured on 300k rows, seed 0: +0.006 / +0.007 / +0.001 AUC over the MAP plug-in)
    posterior_draws: int = 128
    draw_seed: int = 0


@dataclass(frozen=True)
class _LinearLogits:
    """Per impression row and funnel step: logit = offset + slopes . user_vector."""

    offsets: np.ndarray  # (rows, steps)
    slopes: np.ndarray  # (rows, steps, LATENT_DIM)
    users: np.ndarray  # (rows,) user numbers


def impression_numbers(ids: np.ndarray, config: SynthConfig) -> np.ndarray:
    """The generator's impression index of each ``impression_id`` (``imp0000000042`` -> 42)."""
    ids = np.asarray(ids).astype(str)
    if len(ids) and not np.all(np.char.startswith(ids, ID_PREFIX)):
        raise ValueError(f"impression ids do not come from the synthetic generator (e.g. {ids[0]!r})")
    numbers = np.char.lstrip(ids, ID_PREFIX).astype(np.int64)
    if len(numbers) and (numbers.min() < 0 or numbers.max() >= config.rows):
        raise ValueError(f"impression ids outside the generator's {config.rows} rows")
    return numbers


def linear_logits(config: SynthConfig, latent: Latent, rows: np.ndarray) -> _LinearLogits:
    """Read the generator's step logits, for ``rows``, as offset + slopes . user vector."""
    n = config.rows
    zero, one = np.zeros(n), np.ones(n)
    base = np.stack(step_logits(config, latent, zero, zero), axis=1)[rows]
    per_click_affinity = np.stack(step_logits(config, latent, one, zero), axis=1)[rows] - base
    per_convert_affinity = np.stack(step_logits(config, latent, zero, one), axis=1)[rows] - base
    probe = np.stack(step_logits(config, latent, 2 * one, -3 * one), axis=1)[rows]
    if not np.allclose(probe, base + 2 * per_click_affinity - 3 * per_convert_affinity, atol=1e-9):
        raise ValueError("the generator's step logits are no longer affine in the affinities; "
                         "the attainable ceiling needs a new estimator")
    offer_vec = latent.offers.vec[latent.impressions.product[rows]]
    d_click, d_convert = np.zeros((len(rows), LATENT_DIM)), np.zeros((len(rows), LATENT_DIM))
    for j in range(LATENT_DIM):  # affinities are bilinear: their gradient in u is affinities(e_j, offer)
        unit = np.zeros((len(rows), LATENT_DIM))
        unit[:, j] = 1.0
        d_click[:, j], d_convert[:, j] = affinities(unit, offer_vec)
    slopes = (per_click_affinity[:, :, None] * d_click[:, None, :]
              + per_convert_affinity[:, :, None] * d_convert[:, None, :])
    return _LinearLogits(base, slopes, latent.impressions.user[rows])


def entire_space(logits: _LinearLogits, user_vec: np.ndarray) -> np.ndarray:
    """P(step_i = 1 | x) per row: the product of the conditional step probabilities up to i."""
    z = logits.offsets + np.einsum("rsd,rd->rs", logits.slopes, user_vec[logits.users])
    return np.cumprod(1.0 / (1.0 + np.exp(-z)), axis=1)


def _observations(logits: _LinearLogits, labels: np.ndarray, negative_rate: float):
    """Stack every observed (row, step): step 0 on every row, step i where step i-1 happened.
    Rows negative on the first step were kept with ``negative_rate``: they weigh 1 / negative_rate."""
    row_weight = np.where(labels[:, 0] == 0, 1.0 / negative_rate, 1.0)
    parts = []
    for step in range(labels.shape[1]):
        seen = np.ones(len(labels), bool) if step == 0 else labels[:, step - 1] == 1
        parts.append((logits.offsets[seen, step], logits.slopes[seen, step], labels[seen, step],
                      row_weight[seen], logits.users[seen]))
    return [np.concatenate(column) for column in zip(*parts)]


def map_user_vectors(logits: _LinearLogits, labels: np.ndarray, n_users: int, negative_rate: float = 1.0,
                     config: CeilingConfig = CeilingConfig()) -> tuple[np.ndarray, np.ndarray, int]:
    """The MAP user vectors (n_users, LATENT_DIM) by batched Newton steps, the Laplace posterior
    covariance at the MAP (the inverse Hessian of the negative log posterior) and the steps taken."""
    import scipy.sparse as sp

    offsets, slopes, y, weight, users = _observations(logits, labels.astype(np.float64), negative_rate)
    by_user = sp.csr_matrix((weight, (users, np.arange(len(users)))), shape=(n_users, len(users)))
    precision = np.eye(LATENT_DIM) / USER_VECTOR_SD ** 2
    outer = (slopes[:, :, None] * slopes[:, None, :]).reshape(len(slopes), LATENT_DIM * LATENT_DIM)

    def gradient_and_hessian(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = 1.0 / (1.0 + np.exp(-(offsets + np.einsum("od,od->o", slopes, vec[users]))))
        gradient = by_user @ ((p - y)[:, None] * slopes) + vec @ precision
        hessian = (by_user @ ((p * (1 - p))[:, None] * outer)).reshape(n_users, LATENT_DIM, LATENT_DIM)
        return gradient, hessian + precision

    vec, steps = np.zeros((n_users, LATENT_DIM)), config.max_newton_steps
    for step in range(1, config.max_newton_steps + 1):
        gradient, hessian = gradient_and_hessian(vec)
        change = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        vec -= change
        if np.abs(change).max() < config.tolerance:
            steps = step
            break
    return vec, np.linalg.inv(gradient_and_hessian(vec)[1]), steps


def posterior_predictive(logits: _LinearLogits, vec: np.ndarray, covariance: np.ndarray,
                         config: CeilingConfig = CeilingConfig()) -> np.ndarray:
    """E[P(step_i = 1 | x)] over the Laplace posterior N(vec, covariance) of each user's vector, by
    ``config.posterior_draws`` standard-normal draws from a fixed seed, shared by all users (deterministic)."""
    draws = np.random.default_rng(config.draw_seed).standard_normal((config.posterior_draws, LATENT_DIM))
    root = np.linalg.cholesky(covariance)
    total = np.zeros(logits.offsets.shape)
    for draw in draws:
        total += entire_space(logits, vec + root @ draw)
    return total / len(draws)


def attainable_probabilities(record: dict, train_ids: np.ndarray, train_labels: np.ndarray, test_ids: np.ndarray,
                             negative_rate: float = 1.0, config: CeilingConfig = CeilingConfig()) -> dict[str, Any]:
    """Test-row entire-space probabilities with user vectors estimated from the training rows (the
    posterior predictive, and the MAP plug-in), beside the same rows' probabilities with the true
    vectors (which must equal the oracle's)."""
    synth = config_from_generator_record(record)
    latent = draw_latent(synth)
    train_logits = linear_logits(synth, latent, impression_numbers(train_ids, synth))
    n_users = len(latent.users.vec)
    estimated, covariance, steps = map_user_vectors(train_logits, np.asarray(train_labels), n_users, negative_rate,
                                                    config)
    test_logits = linear_logits(synth, latent, impression_numbers(test_ids, synth))
    return {"probabilities": posterior_predictive(test_logits, estimated, covariance, config),
            "map_probabilities": entire_space(test_logits, estimated),
            "true_vector_probabilities": entire_space(test_logits, latent.users.vec),
            "newton_steps": steps, "users": n_users,
            "users_with_training_rows": int(len(np.unique(train_logits.users)))}


def attainable_aucs(record: dict, train_ids: np.ndarray, train_labels: np.ndarray, test_ids: np.ndarray,
                    test_labels: np.ndarray, label_names: list[str], oracle_table=None,
                    negative_rate: float = 1.0) -> dict[str, Any]:
    """The attainable reference's AUC per task on the test rows. With ``oracle_table``, first checks
    that the regenerated generator reproduces the oracle on these rows (else the record is stale)."""
    started = time.perf_counter()
    result = attainable_probabilities(record, train_ids, train_labels, test_ids, negative_rate)
    if oracle_table is not None:
        _check_reproduces_oracle(result["true_vector_probabilities"], test_ids, oracle_table, label_names)
    probs, plug_in = result["probabilities"], result["map_probabilities"]
    return {"tasks": {name: auc(test_labels[:, i], probs[:, i]) for i, name in enumerate(label_names)},
            "map_tasks": {name: auc(test_labels[:, i], plug_in[:, i]) for i, name in enumerate(label_names)},
            "estimator": "Laplace posterior predictive around the MAP user vectors",
            "posterior_draws": CeilingConfig().posterior_draws,
            "train_rows": int(len(train_ids)), "test_rows": int(len(test_ids)), "negative_rate": negative_rate,
            "users": result["users"], "users_with_training_rows": result["users_with_training_rows"],
            "newton_steps": result["newton_steps"], "seconds": time.perf_counter() - started}


def _check_reproduces_oracle(truth: np.ndarray, test_ids: np.ndarray, oracle_table, label_names: list[str]) -> None:
    import pandas as pd

    positions = pd.Index(oracle_table.column("impression_id").to_numpy()).get_indexer(np.asarray(test_ids))
    found = positions >= 0
    for i, name in enumerate(label_names):
        column = f"p_{name}"
        if column not in oracle_table.column_names or not found.any():
            continue
        oracle = oracle_table.column(column).to_numpy()[positions[found]]
        if not np.allclose(truth[found, i], oracle, rtol=1e-9, atol=1e-12):
            raise ValueError(f"oracle/generator.json does not reproduce oracle/truth.parquet ({column}); "
                             "regenerate the dataset with this version of `apem synth`")
