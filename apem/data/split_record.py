"""``split.json``: what the chronological split records beside ``train/``, ``val/`` and ``test/``
(day boundaries, row counts and the negative downsampling rate of ``train/``)."""

from __future__ import annotations

import json
import os

from apem.data.spec import DatasetError

SPLIT_FILE = "split.json"
SPLITS = ("train", "val", "test")


def check_negative_rate(rate: float, error: type[Exception] = ValueError) -> float:
    """The one rule for a negative downsampling rate: a number in (0, 1]."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise error(f"negative_rate must be a number in (0, 1], got {rate!r}") from None
    if not 0.0 < value <= 1.0:
        raise error(f"negative_rate must be in (0, 1], got {rate!r}")
    return value


def read_split_record(split_dir: str) -> dict:
    """The parsed ``<split_dir>/split.json``; DatasetError names the file when it cannot be read."""
    path = os.path.join(split_dir, SPLIT_FILE)
    try:
        with open(path) as fh:
            record = json.load(fh)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (not the output of `apem split`)") from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return record


def negative_rate_of_split(split_dir: str) -> float:
    """The checked ``negative_rate`` recorded in ``<split_dir>/split.json``."""
    record = read_split_record(split_dir)
    return check_negative_rate(record.get("negative_rate", 1.0), DatasetError)


def negative_rate_beside(train_dir: str) -> float:
    """The ``negative_rate`` of ``<train_dir>/../split.json`` when the split wrote one, else 1.0."""
    split_dir = os.path.dirname(os.path.abspath(train_dir))
    if not os.path.exists(os.path.join(split_dir, SPLIT_FILE)):
        return 1.0
    return negative_rate_of_split(split_dir)
