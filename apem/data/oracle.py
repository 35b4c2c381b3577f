"""The oracle sidecar: a dataset made from logs with known truth may carry the true entire-space
probabilities at ``<dataset>/oracle/truth.parquet``, keyed by the spec's id column.

Dataset readers only read top-level Parquet files, so training never sees it; the split and the
experiments carry it along to report oracle AUCs. A synthetic dataset also records its generator
(``oracle/generator.json``: which generator, its config and seed), which the split carries too.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

ORACLE_DIR = "oracle"
ORACLE_FILE = "truth.parquet"
ORACLE_PATH = (ORACLE_DIR, ORACLE_FILE)
# how the truth was made (the synthetic generator's config and seed), so the generator's latent
# draws can be regenerated: the attainable-ceiling reference needs them
GENERATOR_FILE = "generator.json"
GENERATOR_PATH = (ORACLE_DIR, GENERATOR_FILE)


def read_oracle(dataset_dir: str) -> pa.Table | None:
    """The oracle of a local dataset directory, if it carries one."""
    path = os.path.join(dataset_dir, *ORACLE_PATH)
    return pq.read_table(path) if os.path.exists(path) else None


def read_generator(dataset_dir: str) -> dict | None:
    """The generator record beside a local dataset's oracle, if it carries one."""
    path = os.path.join(dataset_dir, *GENERATOR_PATH)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)
