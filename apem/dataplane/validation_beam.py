"""TFDV statistics of a dataset on Apache Beam, so they never need the whole window in memory.

The dataset's Parquet is read in batches (``ReadFromParquetBatched``: one Arrow table per row group),
each batch becomes the columns TFDV reads (:func:`apem.dataplane.validation.tfdv_columns`, the same
function the in-memory path applies), and TFDV's own ``GenerateStatistics`` PTransform combines them.
TFDV 1.16 takes ``pyarrow.RecordBatch`` elements whose columns are list arrays; the in-memory path
(``generate_statistics_from_dataframe``) builds them from pandas, where a NaN is a missing value, so
each batch gets the same: NaN as null, then TFX-BSL's ``CanonicalizeRecordBatch`` (public API).
The statistics are written to ``stats_uri`` (local or gs://, as the runner needs) and returned.

The local engine (:func:`local_statistics`) uses the same transform on the in-process DirectRunner for
datasets from :data:`BATCHED_STATISTICS_ROWS` rows, so its memory no longer grows with the window.
"""

from __future__ import annotations

from typing import Callable

from apem.data import storage
from apem.data.spec import SPEC_FILE, DatasetSpec
from apem.data.streaming import list_units, read_spec
from apem.dataplane.beam_gcs_emulator import anonymous_gcs_for_emulator
from apem.dataplane.beam_options import beam_pipeline
from apem.dataplane.quiet_tensorflow import import_tfdv
from apem.dataplane.validation import compute_statistics, load_statistics, tfdv_columns


def tfdv_record_batches(table, spec: DatasetSpec) -> list:
    """A batch of dataset rows as the RecordBatches TFDV's PTransform reads (module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from tfx_bsl.arrow import table_util

    columns = tfdv_columns(table, spec)
    for index, name in enumerate(columns.column_names):
        column = columns.column(name)
        if pa.types.is_floating(column.type):  # pandas reads NaN as missing: so do these statistics
            columns = columns.set_column(index, name, pc.if_else(pc.is_nan(column), None, column))
    return [table_util.CanonicalizeRecordBatch(batch) for batch in columns.to_batches() if batch.num_rows]


def beam_statistics(runner: str = "DirectRunner", pipeline_args: list[str] | None = None) -> Callable:
    """A ``statistics(data_dir, stats_uri)`` for :func:`apem.dataplane.validation.validate_dataset`
    that runs on Beam with ``runner`` and the Beam options ``pipeline_args``."""

    def statistics(data_dir: str, stats_uri: str):
        return compute_statistics_beam(data_dir, stats_uri, runner=runner, pipeline_args=pipeline_args)

    return statistics


# The local engine computes statistics of a dataset of at least this many rows batch by batch, in this
# process (TFDV's PTransform on the in-process DirectRunner), and of smaller ones from one DataFrame.
# Measured at 10M rows on 2 cores (README, "Dataflow"): the DataFrame path peaked at 6.6 GB in 72 s, the
# batches at 2.0 GB in 83 s; the same statistics (tests/dataplane/test_validation_beam.py). Below 2M
# rows the DataFrame costs at most ~1.3 GB and no pipeline start-up (as the trainer's ``auto`` loading).
BATCHED_STATISTICS_ROWS = 2_000_000
IN_PROCESS = ["--direct_running_mode=in_memory"]


def local_statistics(data_dir: str, stats_uri: str):
    """The local engine's statistics: from one DataFrame (:func:`apem.dataplane.validation.compute_statistics`)
    below :data:`BATCHED_STATISTICS_ROWS` rows, else batch by batch in this process, so memory stays
    bounded whatever the window. The rows are counted from the Parquet footers (on gs:// that reads each
    shard once more, one at a time: the cluster's tasks read artifacts through their /gcs mount instead)."""
    if sum(unit.rows for unit in list_units(data_dir, read_spec(data_dir))) < BATCHED_STATISTICS_ROWS:
        return compute_statistics(data_dir, stats_uri)
    return compute_statistics_beam(data_dir, stats_uri, runner="DirectRunner", pipeline_args=IN_PROCESS)


def statistics_for(engine: str, runner: str = "DirectRunner", pipeline_args: list[str] | None = None):
    """The ``statistics`` argument of ``validate_dataset`` for ``engine`` (``local``:
    :func:`local_statistics`, in this process; ``beam``: :func:`beam_statistics`)."""
    if engine not in ("local", "beam"):
        raise ValueError(f"engine must be 'local' or 'beam', got {engine!r}")
    return beam_statistics(runner, pipeline_args) if engine == "beam" else local_statistics


def compute_statistics_beam(data_dir: str, stats_uri: str, runner: str = "DirectRunner",
                            pipeline_args: list[str] | None = None):
    """TFDV statistics of the dataset at ``data_dir`` computed on Beam, written to ``stats_uri``."""
    import apache_beam as beam
    from apache_beam.io.parquetio import ReadFromParquetBatched

    tfdv = import_tfdv()
    anonymous_gcs_for_emulator()
    spec_uri = storage.join(data_dir, SPEC_FILE)
    if not storage.exists(spec_uri):
        raise FileNotFoundError(f"{spec_uri}: spec file not found (a dataset is Parquet files plus {SPEC_FILE})")
    spec = DatasetSpec.parse(storage.read_bytes(spec_uri), source=spec_uri)
    # one process: the combine is cheap and TFDV's start-up in each worker process is not
    with beam_pipeline(runner, pipeline_args, direct_mode="in_memory") as pipeline:
        _ = (pipeline
             | "ReadParquet" >> ReadFromParquetBatched(storage.join(data_dir, "*.parquet"))
             | "TfdvBatches" >> beam.FlatMap(tfdv_record_batches, spec)
             | "Statistics" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
             | "WriteStatistics" >> tfdv.WriteStatisticsToBinaryFile(stats_uri))
    return load_statistics(stats_uri)
