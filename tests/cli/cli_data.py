"""Datasets shared by the CLI tests."""

from apem.data.features import default_spec
from apem.data.spec import write_dataset
from apem.research.synth import SynthConfig, generate


def write_train_val(root, seed: int):
    """1,500 synthetic rows over 5 days as ``root/train`` (first 1,000) and ``root/val``; returns the table."""
    table, _ = generate(SynthConfig(rows=1_500, days=5, seed=seed))
    write_dataset(table.slice(0, 1_000), default_spec(), str(root / "train"))
    write_dataset(table.slice(1_000), default_spec(), str(root / "val"))
    return table
