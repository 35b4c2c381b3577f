"""Beam pipeline options shared by every Beam job of the data plane (split, ingest, statistics).

``runner`` picks where the job runs; ``pipeline_args`` pass through as Beam options (``--project``,
``--region``, ``--temp_location`` for Dataflow, ``--direct_num_workers`` locally, ...). The same code
runs on DirectRunner, Dataflow, Flink or Spark: only these options change.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

from apem.dataplane import beam_workers

_pipelines_built = []  # one entry per Beam pipeline this process built (see ran_a_beam_pipeline)
EXECUTOR_MAIN = "kfp.dsl.executor_main"  # the module kfp runs a component under, as __main__
_executor_exit = []  # the executor-exit hook, once registered


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


def beam_pipeline(runner: str, pipeline_args: list[str] | None, direct_mode: str = "multi_processing"):
    """A Beam pipeline for :func:`pipeline_options`. Locally in the multi-process mode (DirectRunner on
    Linux, no running mode in the args) its workers die with this process (:mod:`apem.dataplane.beam_workers`)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(pipeline_args or [])
    _pipelines_built.append(runner)
    end_executor_without_teardown()
    if direct_mode != "multi_processing" or not beam_workers.applies(runner, args):
        options = pipeline_options(runner, args, direct_mode)
        if runner == "DirectRunner":  # batch jobs: Beam's FnApiRunner itself, not the DirectRunner's Prism attempt
            return beam.Pipeline(runner=beam_workers.batch_runner(), options=options)
        return beam.Pipeline(options=options)
    if not any(a.startswith(beam_workers.WORKERS_OPTION) for a in args):
        args.append(f"{beam_workers.WORKERS_OPTION}={max(1, min(os.cpu_count() or 1, 8))}")
    return beam.Pipeline(runner=beam_workers.direct_runner(), options=PipelineOptions(args))


def artifact_location(path: str, uri: str, runner: str) -> str:
    """Where a Beam job should read or write a KFP artifact. On the cluster, ``path`` is the pod's
    FUSE mount of the artifact (``/gcs/...``), which remote workers (Dataflow, Flink, Spark) cannot
    see: they get the artifact's ``uri`` (``gs://...``). The DirectRunner runs in the pod, and
    kfp.local's URIs are local paths, so both keep ``path``."""
    return path if runner == "DirectRunner" or "://" not in uri else uri


def ran_a_beam_pipeline() -> bool:
    """Whether this process built a Beam pipeline (its gRPC threads may outlive it: see ``apem.cli.main``)."""
    return bool(_pipelines_built)


def end_executor_without_teardown() -> bool:
    """Workaround, no public API: in a pipeline component's process (kfp's executor is ``__main__``), end it
    without interpreter teardown once the executor is done; whether it applies (elsewhere it does nothing: the
    ``apem`` CLI ends itself so in ``apem.cli.main``, and a test or a notebook keeps its own exit).

    A process that ran a Beam job here sometimes aborts during teardown, after its work and outputs are complete
    ("terminate called without an active exception", SIGABRT; C++ worker threads of Arrow's pools are still alive
    then): 3 of 50 local in-memory splits, and a split task of ``apem pipeline run-local`` in a fresh clone's test
    suite, which marked the run failed. Registered with atexit, so it runs after the executor has written the
    task's outputs (it does so after the component returns); an uncaught exception still exits 1.
    ``tests/dataplane/test_beam_options.py`` runs it under kfp's real executor, so a kfp that renames its
    executor fails there."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != EXECUTOR_MAIN:
        return False
    if _executor_exit:
        return True
    failed = []
    show = sys.excepthook

    def note_failure(*exc_info) -> None:
        failed.append(exc_info[0])
        show(*exc_info)

    def exit_now() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1 if failed else 0)

    sys.excepthook = note_failure
    atexit.register(exit_now)
    _executor_exit.append(exit_now)
    return True
