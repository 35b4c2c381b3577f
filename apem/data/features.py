"""What this project knows about its dataset: the one file a user replaces for their own data
(as the TFX taxi template keeps its ``features.py``).

It names the funnel steps, the feature columns and their roles (the default data contract for raw
logs), and the value ranges, open vocabularies and drift exceptions that validation's schema
curation applies. The synthetic generator (:mod:`apem.research.synth`) writes data of this shape;
nothing in production imports the generator.
"""

from __future__ import annotations

from apem.data.spec import DatasetSpec

TIME_COLUMN = "event_time"
ID_COLUMN = "impression_id"
LABELS = ("click", "authorize", "convert")
CATEGORICAL = (
    "user_id", "product_id", "product_type", "channel", "position", "hour", "weekday", "region",
    "age_band", "segment",
)
NUMERICAL = ("credit_score", "balance", "income", "tenure_months", "products_held", "days_since_login")

# Validation review rules on top of TFDV's inferred schema (the reasons: apem/resources/README.md).
INT_RANGES = {"position": (1, 50), "hour": (0, 23), "weekday": (0, 6)}
FLOAT_RANGES = {"credit_score": (250.0, 900.0), "tenure_months": (0.0, None), "days_since_login": (0.0, None),
                "income": (0.0, None)}
NON_NEGATIVE_INTS = ("products_held",)
OPEN_VOCABULARIES = ("user_id", "product_id")  # new users and offers appear every day
NO_DRIFT = ("weekday",)                          # differs between any two short windows by design
MIN_PRESENCE = {"income": 0.9}
# Balance is heavy tailed: TFDV's equal-width histograms put almost all mass in the first bucket and
# the extremes move the bucket edges, so independent windows of the same process already reach ~0.35.
DRIFT_THRESHOLD_JS_OVERRIDES = {"balance": 0.6}


def default_spec() -> DatasetSpec:
    """The data contract of raw logs ingested without a spec of their own."""
    return DatasetSpec(
        time_column=TIME_COLUMN,
        labels=LABELS,
        categorical=CATEGORICAL,
        numerical=NUMERICAL,
        id_column=ID_COLUMN,
    )
