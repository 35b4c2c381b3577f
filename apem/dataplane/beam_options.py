"""Beam pipeline options shared by every Beam job of the data plane (split, ingest, statistics).

``runner`` picks where the job runs; ``pipeline_args`` pass through as Beam options (``--project``,
``--region``, ``--temp_location`` for Dataflow, ``--direct_num_workers`` locally, ...). The same code
runs on DirectRunner, Dataflow, Flink or Spark: only these options change.
"""

from __future__ import annotations

import os


def pipeline_options(runner: str, pipeline_args: list[str] | None, direct_mode: str = "multi_processing"):
    """Beam ``PipelineOptions`` for ``runner`` plus ``pipeline_args``. On DirectRunner, unless the
    args say otherwise, ``direct_mode`` (``multi_processing``: one worker process per core, at most 8;
    ``in_memory``: one process, no start-up cost)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(pipeline_args or [])
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args += [f"--direct_running_mode={direct_mode}"]
        if direct_mode == "multi_processing" and not any(a.startswith("--direct_num_workers") for a in args):
            args += [f"--direct_num_workers={max(1, min(os.cpu_count() or 1, 8))}"]
    return PipelineOptions(args + [f"--runner={runner}"])
