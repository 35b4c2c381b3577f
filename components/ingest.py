"""ingest: raw daily event partitions of the training window -> one funnel dataset + quarantine."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def ingest(
    raw_uri: str,
    run_date: str,
    window_days: int,
    schedule_time: str,
    attribution_window_days: int,
    dataset: Output[Dataset],
    quarantine: Output[Dataset],
    metrics: Output[Metrics],
    engine: str = "local",
    beam_runner: str = "DirectRunner",
    beam_args: str = "",
) -> str:
    """Ingest the partitions ``dt=YYYY-MM-DD`` of ``raw_uri`` (local or gs://) for the window of
    ``window_days`` days ending on ``run_date``; an empty ``run_date`` means the day before
    ``schedule_time`` (the recurring run's scheduled time, or now when that is not set).
    Rows that cannot be used go to ``quarantine`` with a reason; counts by reason go to ``metrics``.
    Returns the window's last day (YYYY-MM-DD), which names the run's reports.
    ``engine``: ``local`` (one process) or ``beam`` (Apache Beam with ``beam_runner`` and
    ``beam_args``, space-separated Beam options: Dataflow on the cluster by config alone).
    """
    import json
    import os
    import shlex
    import shutil

    from apem.dataplane.ingest import ingest as run_ingest
    from apem.dataplane.ingest import quarantine_path
    from apem.dataplane.window import training_window

    start, end = training_window(run_date, window_days, schedule_time)
    if engine == "beam":
        from apem.dataplane.beam_options import artifact_location
        from apem.dataplane.ingest_beam import ingest_beam

        out = artifact_location(dataset.path, dataset.uri, beam_runner)  # remote workers write the URI
        summary = ingest_beam(raw_uri, start, end, out, attribution_window_days=attribution_window_days,
                              runner=beam_runner, pipeline_args=shlex.split(beam_args))
    elif engine == "local":
        summary = run_ingest(raw_uri, start, end, dataset.path, attribution_window_days=attribution_window_days)
    else:
        raise ValueError(f"engine must be 'local' or 'beam', got {engine!r}")
    # apem.dataplane.ingest writes the quarantine beside the dataset; the artifact gets its own path
    if os.path.isdir(quarantine.path):
        shutil.rmtree(quarantine.path)
    shutil.move(quarantine_path(dataset.path), quarantine.path)

    dataset.metadata.update({"start": start.isoformat(), "end": end.isoformat(), "rows": summary["rows"]})
    quarantine.metadata["counts"] = summary["quarantine"]
    metrics.log_metric("rows", summary["rows"])
    metrics.log_metric("quarantined", sum(summary["quarantine"].values()))
    for reason, count in sorted(summary["quarantine"].items()):
        metrics.log_metric(f"quarantine_{reason}", count)
    print(json.dumps({"window": [start.isoformat(), end.isoformat()], **summary}, default=str))
    return end.isoformat()
