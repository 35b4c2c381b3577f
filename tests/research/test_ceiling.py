"""The attainable reference ("generator known, user vectors estimated") on small synthetic funnels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apem.eval.metrics import auc
from apem.research.ceiling import attainable_aucs, attainable_probabilities
from apem.research.synth import SynthConfig, config_from_generator_record, generate, generator_record

TRAIN_DAYS = 7  # of 10: train on days 0-6, score days 7-9


def _funnel(funnel: str) -> dict:
    """20,000 rows over 10 days: 500 users (the generator's floor), so fewer training rows keep the users."""
    config = SynthConfig(rows=20_000, days=10, seed=1, funnel=funnel)
    table, oracle = generate(config)
    day = (table.column("event_time").to_numpy() - np.datetime64("2026-01-01")) // np.timedelta64(1, "D")
    labels = np.stack([table.column(c).to_numpy() for c in config.labels], axis=1)
    return {"config": config, "record": json.loads(generator_record(config)), "oracle": oracle, "labels": labels,
            "ids": table.column("impression_id").to_numpy(), "train": np.flatnonzero(day < TRAIN_DAYS),
            "test": np.flatnonzero(day >= TRAIN_DAYS)}


@pytest.fixture(scope="module")
def financial3() -> dict:
    return _funnel("financial3")


def _reference(data: dict, train_rows: np.ndarray, **kwargs) -> dict:
    return attainable_aucs(data["record"], data["ids"][train_rows], data["labels"][train_rows],
                           data["ids"][data["test"]], data["labels"][data["test"]], list(data["config"].labels),
                           oracle_table=data["oracle"], **kwargs)


def _oracle_aucs(data: dict) -> dict[str, float]:
    test = data["test"]
    return {name: auc(data["labels"][test, i], data["oracle"].column(f"p_{name}").to_numpy()[test])
            for i, name in enumerate(data["config"].labels)}


def _logit_error(data: dict, train_rows: np.ndarray) -> float:
    """Mean squared log-odds distance of the estimated test probabilities to the true ones (all tasks)."""
    result = attainable_probabilities(data["record"], data["ids"][train_rows], data["labels"][train_rows],
                                      data["ids"][data["test"]])
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    return float(np.mean((logit(result["probabilities"]) - logit(result["true_vector_probabilities"])) ** 2))


def test_attainable_lies_between_chance_and_the_oracle_and_rises_with_rows_per_user(financial3) -> None:
    train = financial3["train"]
    none, few, all_rows = (_reference(financial3, rows) for rows in (train[:0], train[::8], train))
    oracle = _oracle_aucs(financial3)
    assert all_rows["users"] == few["users"] == 500 and all_rows["train_rows"] == len(train)
    for task in ("click", "authorize", "convert"):
        assert 0.5 < all_rows["tasks"][task] < oracle[task]
    # the user vectors are used: the click ranking gains well over the prior mean (all vectors 0) ...
    assert all_rows["tasks"]["click"] > none["tasks"]["click"] + 0.04
    assert all_rows["tasks"]["convert"] > none["tasks"]["convert"] + 0.04
    # ... and gains more with 8x the rows per user (about 3.5 vs 28 rows per user here)
    assert all_rows["tasks"]["click"] > few["tasks"]["click"] + 0.03
    errors = [_logit_error(financial3, rows) for rows in (train[:0], train[::8], train)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.8 * errors[0]
    assert all_rows["newton_steps"] < 50  # converged, not stopped at the cap
    for task in ("click", "authorize", "convert"):  # the MAP plug-in is reported beside the posterior average
        assert 0.5 < all_rows["map_tasks"][task] < oracle[task]
        assert all_rows["map_tasks"][task] != all_rows["tasks"][task]
    assert all_rows["map_tasks"]["click"] > none["map_tasks"]["click"] + 0.04


def test_attainable_is_deterministic_and_weights_sampled_negatives(financial3) -> None:
    train = financial3["train"]
    first, again = (_reference(financial3, train)["tasks"] for _ in range(2))
    assert first == again
    # with half the click negatives dropped, weighting the kept ones by 2 stays near the full-data estimate
    keep = train[(financial3["labels"][train, 0] == 1) | (np.arange(len(train)) % 2 == 0)]
    weighted, unweighted = _reference(financial3, keep, negative_rate=0.5), _reference(financial3, keep)
    assert abs(weighted["tasks"]["click"] - first["click"]) < 0.02
    assert weighted["negative_rate"] == 0.5 and unweighted["negative_rate"] == 1.0


def test_a_generator_record_that_does_not_reproduce_the_oracle_is_refused(financial3) -> None:
    other = {**financial3, "record": json.loads(generator_record(
        SynthConfig(rows=20_000, days=10, seed=2, funnel="financial3")))}
    with pytest.raises(ValueError, match="does not reproduce oracle/truth.parquet"):
        _reference(other, financial3["train"])
    assert config_from_generator_record(financial3["record"]) == financial3["config"]
    with pytest.raises(ValueError, match="not from apem.research.synth"):
        config_from_generator_record({"generator": "elsewhere", "config": {}})


def test_sparse_two_step_funnel_has_an_attainable_reference_too() -> None:
    data = _funnel("sparse2")
    train = data["train"]
    none, estimated = _reference(data, train[:0]), _reference(data, train)
    oracle = _oracle_aucs(data)
    assert set(estimated["tasks"]) == {"click", "convert"}
    for task in ("click", "convert"):
        assert 0.5 < estimated["tasks"][task] < oracle[task]
    assert estimated["tasks"]["click"] > none["tasks"]["click"] + 0.03
