"""Synthetic financial-service funnel logs with known truth.

Impression -> click -> authorize -> convert, generated from latent structure that model choice can
exploit or miss:

- users and offers carry latent vectors; their affinity drives click and convert (embeddings can learn it)
- balance and income are heavy-tailed (log-normal, some zeros, negatives and NaN); their effect is on
  a log scale, so log-round discretization matters
- position bias, hour-of-day and weekday effects, and a drift across days
- each step has its own drivers: click is affinity/position/time, authorize is credit and balance,
  convert is income, tenure and product type
- strict sequential dependence: a step can only be 1 when the step before it is 1

The true entire-space probabilities P(T_i=1|X) go to ``<out>/oracle/truth.parquet`` keyed by
``impression_id``; dataset readers only read top-level Parquet files, so training never sees them.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apem.spec import DatasetSpec, write_dataset

LABELS = ("click", "authorize", "convert")
CATEGORICAL = (
    "user_id", "product_id", "product_type", "channel", "position", "hour", "weekday", "region",
    "age_band", "segment",
)
NUMERICAL = ("credit_score", "balance", "income", "tenure_months", "products_held", "days_since_login")
PRODUCT_TYPES = np.array(["loan", "deposit", "fund", "card"])
CHANNELS = np.array(["app", "web", "sms", "branch"])
SEGMENTS = np.array(["mass", "affluent", "private", "student", "sme"])
AGE_BANDS = np.array(["18-25", "26-35", "36-45", "46-55", "56-65", "65+"])
ORACLE_DIR = "oracle"
ORACLE_FILE = "truth.parquet"
START_DATE = dt.date(2026, 1, 1)
LATENT_DIM = 8


def default_spec() -> DatasetSpec:
    return DatasetSpec(
        time_column="event_time",
        labels=LABELS,
        categorical=CATEGORICAL,
        numerical=NUMERICAL,
        id_column="impression_id",
    )


@dataclass(frozen=True)
class SynthConfig:
    rows: int = 300_000
    days: int = 30
    seed: int = 0
    start: dt.date = START_DATE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _prefixed(prefix: str, ids: np.ndarray, width: int) -> pa.Array:
    return pa.array(np.char.add(prefix, np.char.zfill(ids.astype(str), width)))


def generate(config: SynthConfig) -> tuple[pa.Table, pa.Table]:
    """Return (dataset table, oracle table). Fully vectorized; 1M rows take a few seconds."""
    rng = np.random.default_rng(config.seed)
    n, days = config.rows, config.days
    n_users = max(500, n // 40)
    n_products = 60

    # Users: latent taste, demographics, finances (heavy tails, zeros, overdrafts, missing income).
    user_vec = rng.normal(size=(n_users, LATENT_DIM))
    user_region = rng.integers(0, 30, n_users)
    user_age = rng.choice(len(AGE_BANDS), n_users, p=[0.12, 0.25, 0.23, 0.18, 0.13, 0.09])
    user_segment = rng.choice(len(SEGMENTS), n_users, p=[0.6, 0.2, 0.03, 0.1, 0.07])
    user_credit = np.clip(rng.normal(680, 70, n_users) + 25 * (user_segment == 1), 300, 850)
    user_balance = rng.lognormal(8.0, 1.9, n_users) * (1 + 9 * (user_segment == 2))
    user_balance[rng.random(n_users) < 0.08] = 0.0
    overdraft = rng.random(n_users) < 0.03
    user_balance[overdraft] = -rng.lognormal(5.5, 1.0, overdraft.sum())
    user_income = rng.lognormal(10.6, 0.6, n_users)
    user_income[rng.random(n_users) < 0.02] = np.nan
    user_tenure = rng.gamma(2.0, 24.0, n_users)
    user_products = rng.poisson(1.5, n_users)
    user_activity = rng.gamma(1.0, 1.0, n_users)  # heavy users see more impressions

    # Offers: type and latent profile.
    prod_type = rng.choice(len(PRODUCT_TYPES), n_products, p=[0.35, 0.25, 0.25, 0.15])
    prod_vec = rng.normal(size=(n_products, LATENT_DIM))
    prod_quality = rng.normal(0, 0.3, n_products)

    # Impressions.
    day_weight = 1.0 + 0.15 * np.isin((np.arange(days) + START_DATE.weekday()) % 7, [0, 1, 2, 3, 4])
    day = np.sort(rng.choice(days, n, p=day_weight / day_weight.sum()))
    hour_profile = np.array([1, 1, 1, 1, 1, 2, 4, 6, 8, 9, 9, 9, 10, 9, 8, 8, 8, 9, 11, 12, 12, 9, 5, 2.0])
    hour = rng.choice(24, n, p=hour_profile / hour_profile.sum())
    seconds = hour * 3600 + rng.integers(0, 3600, n)
    weekday = (day + config.start.weekday()) % 7
    user = rng.choice(n_users, n, p=user_activity / user_activity.sum())
    product = rng.integers(0, n_products, n)
    channel = rng.choice(len(CHANNELS), n, p=[0.55, 0.25, 0.12, 0.08])
    position = np.minimum(rng.geometric(0.35, n), 8)
    days_since_login = np.floor(rng.exponential(6.0, n) * (1 + (channel == 2)))

    credit = np.round(user_credit[user] + rng.normal(0, 8, n))
    balance = np.round(user_balance[user] * rng.lognormal(0, 0.1, n), 2)
    income = user_income[user]
    tenure = np.floor(user_tenure[user] + day / 30.0)
    products_held = user_products[user]
    ptype = prod_type[product]
    drift = day / max(days - 1, 1)  # 0 at the first day, 1 at the last

    affinity = np.einsum("ij,ij->i", user_vec[user, :4], prod_vec[product, :4]) / 2.0
    affinity_convert = np.einsum("ij,ij->i", user_vec[user, 4:], prod_vec[product, 4:]) / 2.0
    log_balance = np.sign(balance) * np.log1p(np.abs(balance))
    log_income = np.log(np.nan_to_num(income, nan=np.exp(10.0)))  # missing income reads as low

    # Step 1: click. Affinity, position, time of day, channel; funds gain favour over the window.
    hour_effect = 0.35 * np.sin((hour - 9) / 24 * 2 * np.pi)
    weekday_effect = np.where(weekday >= 5, -0.2, 0.05)
    channel_effect = np.array([0.3, 0.0, -0.5, 0.4])[channel]
    position_effect = -0.45 * np.log(position)
    type_drift = np.array([-0.3, 0.0, 0.6, 0.0])[ptype] * drift
    logit_click = (
        -3.3 + 1.0 * affinity + position_effect + hour_effect + weekday_effect + channel_effect
        + type_drift + prod_quality[product] - 0.08 * np.log1p(days_since_login)
    )
    # Step 2: authorize | click. Credit for loans and cards, balance on a log scale for deposits and funds.
    credit_z = (credit - 680) / 70
    needs_credit = np.isin(ptype, [0, 3])
    logit_auth = (
        -0.85 + np.where(needs_credit, 1.1 * credit_z, 0.45 * (log_balance - 7.5) / 2.0)
        + np.array([0.0, 0.4, 0.2, -0.3, 0.3])[user_segment[user]] + 0.25 * affinity
        - 0.3 * (user_age[user] == 0)
    )
    # Step 3: convert | authorize. Income, tenure, product type and the second half of the taste vector.
    logit_convert = (
        -1.25 + 0.8 * (log_income - 10.6) + 0.25 * np.log1p(tenure / 12) + 0.9 * affinity_convert
        + np.array([0.3, -0.2, -0.4, 0.1])[ptype] - 0.15 * products_held + 0.3 * drift
    )
    p_click = _sigmoid(logit_click)
    p_auth_given_click = _sigmoid(logit_auth)
    p_conv_given_auth = _sigmoid(logit_convert)
    click = rng.random(n) < p_click
    authorize = click & (rng.random(n) < p_auth_given_click)
    convert = authorize & (rng.random(n) < p_conv_given_auth)

    base = np.datetime64(config.start.isoformat(), "s")
    event_time = base + (day.astype("int64") * 86400 + seconds).astype("timedelta64[s]")
    impression_id = _prefixed("imp", np.arange(n), 10)
    table = pa.table({
        "impression_id": impression_id,
        "event_time": pa.array(event_time.astype("datetime64[us]")),
        "user_id": _prefixed("u", user, 7),
        "product_id": _prefixed("p", product, 3),
        "product_type": pa.array(PRODUCT_TYPES[ptype]),
        "channel": pa.array(CHANNELS[channel]),
        "position": pa.array(position.astype(np.int64)),
        "hour": pa.array(hour.astype(np.int64)),
        "weekday": pa.array(weekday.astype(np.int64)),
        "region": _prefixed("r", user_region[user], 2),
        "age_band": pa.array(AGE_BANDS[user_age[user]]),
        "segment": pa.array(SEGMENTS[user_segment[user]]),
        "credit_score": pa.array(credit),
        "balance": pa.array(balance),
        "income": pa.array(income, from_pandas=True),
        "tenure_months": pa.array(tenure),
        "products_held": pa.array(products_held.astype(np.int64)),
        "days_since_login": pa.array(days_since_login),
        "click": pa.array(click.astype(np.int8)),
        "authorize": pa.array(authorize.astype(np.int8)),
        "convert": pa.array(convert.astype(np.int8)),
    })
    oracle = pa.table({
        "impression_id": impression_id,
        "p_click": pa.array(p_click),
        "p_authorize": pa.array(p_click * p_auth_given_click),
        "p_convert": pa.array(p_click * p_auth_given_click * p_conv_given_auth),
    })
    return table, oracle


def write_synthetic_dataset(config: SynthConfig, out: str) -> dict:
    """Write the dataset and its oracle; return a summary with rates and oracle AUCs."""
    table, oracle = generate(config)
    spec = default_spec()
    write_dataset(table, spec, out)
    oracle_dir = os.path.join(out, ORACLE_DIR)
    os.makedirs(oracle_dir, exist_ok=True)
    pq.write_table(oracle, os.path.join(oracle_dir, ORACLE_FILE))
    return summarize(table, oracle, config)


def summarize(table: pa.Table, oracle: pa.Table, config: SynthConfig) -> dict:
    from apem.metrics import auc

    labels = np.stack([table.column(c).to_numpy() for c in LABELS], axis=1).astype(np.float64)
    day = (table.column("event_time").to_numpy() - np.datetime64(config.start.isoformat())) // np.timedelta64(1, "D")
    last = day >= (config.days - max(1, int(round(config.days * 0.1))))
    rates = {
        "ctr": float(labels[:, 0].mean()),
        "authorize_given_click": float(labels[:, 1].sum() / max(labels[:, 0].sum(), 1)),
        "convert_given_authorize": float(labels[:, 2].sum() / max(labels[:, 1].sum(), 1)),
    }
    oracle_auc = {
        name: auc(labels[last, i], oracle.column(f"p_{name}").to_numpy()[last]) for i, name in enumerate(LABELS)
    }
    return {"rows": table.num_rows, "days": config.days, "seed": config.seed, "rates": rates,
            "oracle_auc_last_10pct_days": oracle_auc}


def read_oracle(dataset_dir: str) -> pa.Table | None:
    """The oracle for a dataset directory, if it carries one."""
    path = os.path.join(dataset_dir, ORACLE_DIR, ORACLE_FILE)
    return pq.read_table(path) if os.path.exists(path) else None
