"""The oracle sidecar: a dataset made from logs with known truth may carry the true entire-space
probabilities at ``<dataset>/oracle/truth.parquet``, keyed by the spec's id column.

Dataset readers only read top-level Parquet files, so training never sees it; the split and the
experiments carry it along to report oracle AUCs.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

ORACLE_DIR = "oracle"
ORACLE_FILE = "truth.parquet"
ORACLE_PATH = (ORACLE_DIR, ORACLE_FILE)


def read_oracle(dataset_dir: str) -> pa.Table | None:
    """The oracle of a local dataset directory, if it carries one."""
    path = os.path.join(dataset_dir, *ORACLE_PATH)
    return pq.read_table(path) if os.path.exists(path) else None
