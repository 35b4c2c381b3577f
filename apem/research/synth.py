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

Two funnels (``SynthConfig.funnel``): ``financial3`` (the default, click -> authorize -> convert)
and ``sparse2``, a 2-step click -> convert funnel shaped like Ali-CCP (CTR about 4%, conversion
given click under 1%) over the same users, offers and impressions, to mirror the paper's second
dataset. Its conversion logit adds the authorize and convert drivers, so numericals still matter.

The true entire-space probabilities P(T_i=1|X) go to ``<out>/oracle/truth.parquet`` keyed by
``impression_id``; dataset readers only read top-level Parquet files, so training never sees them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apem.data.features import CATEGORICAL, LABELS, NUMERICAL, default_spec
from apem.data.oracle import GENERATOR_FILE, ORACLE_DIR, ORACLE_FILE
from apem.data.ownership import DATASET_DIR, claim_output
from apem.data.spec import write_dataset

PRODUCT_TYPES = np.array(["loan", "deposit", "fund", "card"])
CHANNELS = np.array(["app", "web", "sms", "branch"])
SEGMENTS = np.array(["mass", "affluent", "private", "student", "sme"])
AGE_BANDS = np.array(["18-25", "26-35", "36-45", "46-55", "56-65", "65+"])
START_DATE = dt.date(2026, 1, 1)
LATENT_DIM = 8
# user taste vectors are drawn from N(0, USER_VECTOR_SD^2 I): the prior the attainable ceiling
# (apem.research.ceiling) estimates them under
USER_VECTOR_SD = 1.0


FUNNELS = ("financial3", "sparse2")
# sparse2 offsets on the logit scale, measured on 100k rows of seed 0: CTR 4.2%, convert | click 0.7%
SPARSE_CLICK_SHIFT = -0.2
SPARSE_CONVERT_SHIFT = -4.5


@dataclass(frozen=True)
class SynthConfig:
    rows: int = 300_000
    days: int = 30
    seed: int = 0
    start: dt.date = START_DATE
    funnel: str = "financial3"

    def __post_init__(self) -> None:
        if self.funnel not in FUNNELS:
            raise ValueError(f"funnel {self.funnel!r} is not one of {', '.join(FUNNELS)}")

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS if self.funnel == "financial3" else (LABELS[0], LABELS[-1])

    def to_record(self) -> dict:
        """The JSON written to ``<dataset>/oracle/generator.json``: enough to regenerate the data."""
        return {**dataclasses.asdict(self), "start": self.start.isoformat()}

    @classmethod
    def from_record(cls, record: dict) -> "SynthConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        if "start" in values:
            values["start"] = dt.date.fromisoformat(values["start"])
        return cls(**values)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _prefixed(prefix: str, ids: np.ndarray, width: int) -> pa.Array:
    return pa.array(np.char.add(prefix, np.char.zfill(ids.astype(str), width)))


@dataclass(frozen=True)
class _Users:
    """Per-user draws: latent taste, demographics and finances (indexed by user number)."""

    vec: np.ndarray
    region: np.ndarray
    age: np.ndarray
    segment: np.ndarray
    credit: np.ndarray
    balance: np.ndarray
    income: np.ndarray
    tenure: np.ndarray
    products: np.ndarray
    activity: np.ndarray


@dataclass(frozen=True)
class _Offers:
    """Per-offer draws: product type, latent profile and a quality offset."""

    ptype: np.ndarray
    vec: np.ndarray
    quality: np.ndarray


@dataclass(frozen=True)
class _Impressions:
    """Per-impression context (when, who, what, where on the page) and the user's numericals at that time."""

    day: np.ndarray
    hour: np.ndarray
    seconds: np.ndarray
    weekday: np.ndarray
    user: np.ndarray
    product: np.ndarray
    channel: np.ndarray
    position: np.ndarray
    days_since_login: np.ndarray
    credit: np.ndarray
    balance: np.ndarray
    income: np.ndarray
    tenure: np.ndarray
    products_held: np.ndarray
    ptype: np.ndarray
    drift: np.ndarray


def _draw_users(rng: np.random.Generator, n_users: int) -> _Users:
    """Heavy tails, zeros, overdrafts and missing income: the shapes that make discretization matter."""
    vec = rng.normal(0.0, USER_VECTOR_SD, size=(n_users, LATENT_DIM))
    region = rng.integers(0, 30, n_users)
    age = rng.choice(len(AGE_BANDS), n_users, p=[0.12, 0.25, 0.23, 0.18, 0.13, 0.09])
    segment = rng.choice(len(SEGMENTS), n_users, p=[0.6, 0.2, 0.03, 0.1, 0.07])
    credit = np.clip(rng.normal(680, 70, n_users) + 25 * (segment == 1), 300, 850)
    balance = rng.lognormal(8.0, 1.9, n_users) * (1 + 9 * (segment == 2))
    balance[rng.random(n_users) < 0.08] = 0.0
    overdraft = rng.random(n_users) < 0.03
    balance[overdraft] = -rng.lognormal(5.5, 1.0, overdraft.sum())
    income = rng.lognormal(10.6, 0.6, n_users)
    income[rng.random(n_users) < 0.02] = np.nan
    tenure = rng.gamma(2.0, 24.0, n_users)
    products = rng.poisson(1.5, n_users)
    activity = rng.gamma(1.0, 1.0, n_users)  # heavy users see more impressions
    return _Users(vec, region, age, segment, credit, balance, income, tenure, products, activity)


def _draw_offers(rng: np.random.Generator, n_products: int) -> _Offers:
    ptype = rng.choice(len(PRODUCT_TYPES), n_products, p=[0.35, 0.25, 0.25, 0.15])
    vec = rng.normal(size=(n_products, LATENT_DIM))
    quality = rng.normal(0, 0.3, n_products)
    return _Offers(ptype, vec, quality)


def _draw_impressions(rng: np.random.Generator, config: SynthConfig, users: _Users,
                      offers: _Offers) -> _Impressions:
    """Impression context (weekday-weighted days, a daily traffic curve, activity-weighted users), then
    the user's numericals as seen at the impression: jittered credit and balance, tenure growing by day."""
    n, days = config.rows, config.days
    day_weight = 1.0 + 0.15 * np.isin((np.arange(days) + START_DATE.weekday()) % 7, [0, 1, 2, 3, 4])
    day = np.sort(rng.choice(days, n, p=day_weight / day_weight.sum()))
    hour_profile = np.array([1, 1, 1, 1, 1, 2, 4, 6, 8, 9, 9, 9, 10, 9, 8, 8, 8, 9, 11, 12, 12, 9, 5, 2.0])
    hour = rng.choice(24, n, p=hour_profile / hour_profile.sum())
    seconds = hour * 3600 + rng.integers(0, 3600, n)
    weekday = (day + config.start.weekday()) % 7
    user = rng.choice(len(users.activity), n, p=users.activity / users.activity.sum())
    product = rng.integers(0, len(offers.ptype), n)
    channel = rng.choice(len(CHANNELS), n, p=[0.55, 0.25, 0.12, 0.08])
    position = np.minimum(rng.geometric(0.35, n), 8)
    days_since_login = np.floor(rng.exponential(6.0, n) * (1 + (channel == 2)))

    credit = np.round(users.credit[user] + rng.normal(0, 8, n))
    balance = np.round(users.balance[user] * rng.lognormal(0, 0.1, n), 2)
    income = users.income[user]
    tenure = np.floor(users.tenure[user] + day / 30.0)
    products_held = users.products[user]
    ptype = offers.ptype[product]
    drift = day / max(days - 1, 1)  # 0 at the first day, 1 at the last
    return _Impressions(day, hour, seconds, weekday, user, product, channel, position, days_since_login,
                        credit, balance, income, tenure, products_held, ptype, drift)


def _click_logit(imp: _Impressions, offers: _Offers, affinity: np.ndarray) -> np.ndarray:
    """Step 1: click. Affinity, position, time of day, channel; funds gain favour over the window."""
    hour_effect = 0.35 * np.sin((imp.hour - 9) / 24 * 2 * np.pi)
    weekday_effect = np.where(imp.weekday >= 5, -0.2, 0.05)
    channel_effect = np.array([0.3, 0.0, -0.5, 0.4])[imp.channel]
    position_effect = -0.45 * np.log(imp.position)
    type_drift = np.array([-0.3, 0.0, 0.6, 0.0])[imp.ptype] * imp.drift
    return (
        -3.3 + 1.0 * affinity + position_effect + hour_effect + weekday_effect + channel_effect
        + type_drift + offers.quality[imp.product] - 0.08 * np.log1p(imp.days_since_login)
    )


def _authorize_logit(imp: _Impressions, users: _Users, affinity: np.ndarray) -> np.ndarray:
    """Step 2: authorize | click. Credit for loans and cards, balance on a log scale for deposits and funds."""
    log_balance = np.sign(imp.balance) * np.log1p(np.abs(imp.balance))
    credit_z = (imp.credit - 680) / 70
    needs_credit = np.isin(imp.ptype, [0, 3])
    return (
        -0.85 + np.where(needs_credit, 1.1 * credit_z, 0.45 * (log_balance - 7.5) / 2.0)
        + np.array([0.0, 0.4, 0.2, -0.3, 0.3])[users.segment[imp.user]] + 0.25 * affinity
        - 0.3 * (users.age[imp.user] == 0)
    )


def _convert_logit(imp: _Impressions, affinity_convert: np.ndarray) -> np.ndarray:
    """Step 3: convert | authorize. Income, tenure, product type and the second half of the taste vector."""
    log_income = np.log(np.nan_to_num(imp.income, nan=np.exp(10.0)))  # missing income reads as low
    return (
        -1.25 + 0.8 * (log_income - 10.6) + 0.25 * np.log1p(imp.tenure / 12) + 0.9 * affinity_convert
        + np.array([0.3, -0.2, -0.4, 0.1])[imp.ptype] - 0.15 * imp.products_held + 0.3 * imp.drift
    )


def _dataset_table(config: SynthConfig, imp: _Impressions, users: _Users, impression_id: pa.Array,
                   labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> pa.Table:
    base = np.datetime64(config.start.isoformat(), "s")
    event_time = base + (imp.day.astype("int64") * 86400 + imp.seconds).astype("timedelta64[s]")
    click, authorize, convert = labels
    return pa.table({
        "impression_id": impression_id,
        "event_time": pa.array(event_time.astype("datetime64[us]")),
        "user_id": _prefixed("u", imp.user, 7),
        "product_id": _prefixed("p", imp.product, 3),
        "product_type": pa.array(PRODUCT_TYPES[imp.ptype]),
        "channel": pa.array(CHANNELS[imp.channel]),
        "position": pa.array(imp.position.astype(np.int64)),
        "hour": pa.array(imp.hour.astype(np.int64)),
        "weekday": pa.array(imp.weekday.astype(np.int64)),
        "region": _prefixed("r", users.region[imp.user], 2),
        "age_band": pa.array(AGE_BANDS[users.age[imp.user]]),
        "segment": pa.array(SEGMENTS[users.segment[imp.user]]),
        "credit_score": pa.array(imp.credit),
        "balance": pa.array(imp.balance),
        "income": pa.array(imp.income, from_pandas=True),
        "tenure_months": pa.array(imp.tenure),
        "products_held": pa.array(imp.products_held.astype(np.int64)),
        "days_since_login": pa.array(imp.days_since_login),
        "click": pa.array(click.astype(np.int8)),
        "authorize": pa.array(authorize.astype(np.int8)),
        "convert": pa.array(convert.astype(np.int8)),
    })


@dataclass(frozen=True)
class Latent:
    """Everything the generator draws before the outcomes: users, offers and impressions."""

    users: _Users
    offers: _Offers
    impressions: _Impressions


def draw_latent(config: SynthConfig, rng: np.random.Generator | None = None) -> Latent:
    """The generator's draws up to (not including) the outcomes, from ``config.seed`` unless ``rng`` is given."""
    rng = np.random.default_rng(config.seed) if rng is None else rng
    users = _draw_users(rng, max(500, config.rows // 40))
    offers = _draw_offers(rng, 60)
    return Latent(users, offers, _draw_impressions(rng, config, users, offers))


def affinities(user_vec: np.ndarray, offer_vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise taste affinities: the first half of the vectors drives clicks, the second half conversions."""
    half = LATENT_DIM // 2
    return (np.einsum("ij,ij->i", user_vec[:, :half], offer_vec[:, :half]) / 2.0,
            np.einsum("ij,ij->i", user_vec[:, half:], offer_vec[:, half:]) / 2.0)


def step_logits(config: SynthConfig, latent: Latent, affinity: np.ndarray,
                affinity_convert: np.ndarray) -> tuple[np.ndarray, ...]:
    """The logit of each funnel step given the step before it (``config.labels`` order), per impression."""
    imp, users, offers = latent.impressions, latent.users, latent.offers
    if config.funnel == "sparse2":
        # click, then convert | click from the authorize and convert drivers together
        return (_click_logit(imp, offers, affinity) + SPARSE_CLICK_SHIFT,
                _authorize_logit(imp, users, affinity) + _convert_logit(imp, affinity_convert) + SPARSE_CONVERT_SHIFT)
    return (_click_logit(imp, offers, affinity), _authorize_logit(imp, users, affinity),
            _convert_logit(imp, affinity_convert))


def generate(config: SynthConfig) -> tuple[pa.Table, pa.Table]:
    """Return (dataset table, oracle table). Fully vectorized; 1M rows take a few seconds.

    The random draws happen in a fixed order (users, offers, impressions, then the funnel steps): a
    given seed must keep giving the same tables, so new draws go at the end."""
    rng = np.random.default_rng(config.seed)
    latent = draw_latent(config, rng)
    imp = latent.impressions
    conditional = [_sigmoid(z) for z in step_logits(
        config, latent, *affinities(latent.users.vec[imp.user], latent.offers.vec[imp.product]))]
    # Strict sequential dependence: a step can only happen when the step before it did.
    n = config.rows
    outcomes, entire_space = [], []
    for p in conditional:
        happened = rng.random(n) < p
        outcomes.append(happened if not outcomes else outcomes[-1] & happened)
        entire_space.append(p if not entire_space else entire_space[-1] * p)
    impression_id = _prefixed("imp", np.arange(n), 10)
    oracle = pa.table({"impression_id": impression_id,
                       **{f"p_{name}": pa.array(p) for name, p in zip(config.labels, entire_space)}})
    if config.funnel == "sparse2":
        click, convert = outcomes
        table = _dataset_table(config, imp, latent.users, impression_id, (click, convert, convert))
        return table.drop(["authorize"]), oracle
    return _dataset_table(config, imp, latent.users, impression_id, tuple(outcomes)), oracle


def write_synthetic_dataset(config: SynthConfig, out: str, overwrite: bool = False) -> dict:
    """Write the dataset and its oracle; return a summary with rates and oracle AUCs. Only an earlier
    dataset (or anything, with ``overwrite``) is replaced."""
    claim_output(out, DATASET_DIR, overwrite=overwrite)
    table, oracle = generate(config)
    spec = dataclasses.replace(default_spec(), labels=config.labels)
    write_dataset(table, spec, out)
    oracle_dir = os.path.join(out, ORACLE_DIR)
    os.makedirs(oracle_dir, exist_ok=True)
    pq.write_table(oracle, os.path.join(oracle_dir, ORACLE_FILE))
    with open(os.path.join(oracle_dir, GENERATOR_FILE), "w") as fh:
        fh.write(generator_record(config))
    return summarize(table, oracle, config)


GENERATOR_NAME = "apem.research.synth"


def generator_record(config: SynthConfig) -> str:
    """``oracle/generator.json``: which generator made the truth and with what config (seed included)."""
    return json.dumps({"generator": GENERATOR_NAME, "config": config.to_record()}, indent=2)


def config_from_generator_record(record: dict) -> SynthConfig:
    if not isinstance(record, dict) or record.get("generator") != GENERATOR_NAME:
        raise ValueError(f"generator record is not from {GENERATOR_NAME}: {str(record)[:80]}")
    return SynthConfig.from_record(record["config"])


def summarize(table: pa.Table, oracle: pa.Table, config: SynthConfig) -> dict:
    from apem.eval.metrics import auc

    names = config.labels
    labels = np.stack([table.column(c).to_numpy() for c in names], axis=1).astype(np.float64)
    day = (table.column("event_time").to_numpy() - np.datetime64(config.start.isoformat())) // np.timedelta64(1, "D")
    last = day >= (config.days - max(1, int(round(config.days * 0.1))))
    rates = {"ctr": float(labels[:, 0].mean())}
    for i in range(1, len(names)):
        rates[f"{names[i]}_given_{names[i - 1]}"] = float(labels[:, i].sum() / max(labels[:, i - 1].sum(), 1))
    oracle_auc = {
        name: auc(labels[last, i], oracle.column(f"p_{name}").to_numpy()[last]) for i, name in enumerate(names)
    }
    return {"rows": table.num_rows, "days": config.days, "seed": config.seed, "funnel": config.funnel, "rates": rates,
            "oracle_auc_last_10pct_days": oracle_auc}
