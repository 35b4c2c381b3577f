"""The Kubeflow side: compile the pipeline and schedule daily recurring runs on a KFP cluster.

A recurring run leaves ``run_date`` empty; the ingest task then trains on the window ending the
day before the run's *scheduled* time (:func:`apem.dataplane.window.training_window`), so a run
that starts late, or is retried, still trains on the same days. KFP cron expressions have six
fields (seconds first): ``0 0 2 * * *`` is every day at 02:00:00 UTC. A classic 5-field expression
is accepted and gets ``0`` seconds prepended.
"""

from __future__ import annotations

import os
import tempfile

DEFAULT_CRON = "0 0 2 * * *"
DEFAULT_JOB_NAME = "apem-daily-retrain"
DEFAULT_EXPERIMENT = "apem"


def kfp_cron(expression: str) -> str:
    """A 6-field KFP cron expression (seconds minutes hours day-of-month month day-of-week)."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0"] + fields
    if len(fields) != 6:
        raise ValueError(
            f"cron {expression!r}: KFP needs 6 fields (seconds minutes hours day month weekday), "
            f"e.g. {DEFAULT_CRON!r} for 02:00 UTC daily"
        )
    return " ".join(fields)


def recurring_run_arguments(package_path: str, experiment_id: str, cron: str = DEFAULT_CRON,
                            job_name: str = DEFAULT_JOB_NAME, params: dict | None = None,
                            service_account: str | None = None, pipeline_root: str | None = None) -> dict:
    """Keyword arguments of ``kfp.Client.create_recurring_run`` for the daily run.

    ``run_date`` is forced empty so each run takes its date from its scheduled time; one run at a
    time, and no catch-up of missed days (a late day is retrained by hand with an explicit run_date).
    """
    params = dict(params or {})
    if params.get("run_date"):
        raise ValueError("a recurring run takes its date from the schedule: leave run_date empty")
    params["run_date"] = ""
    arguments = dict(
        experiment_id=experiment_id, job_name=job_name, cron_expression=kfp_cron(cron),
        max_concurrency=1, no_catchup=True, params=params, pipeline_package_path=package_path,
        description="APEM daily retraining: ingest, validate, split, train, evaluate, push",
        enabled=True,
    )
    if service_account:
        arguments["service_account"] = service_account
    if pipeline_root:
        arguments["pipeline_root"] = pipeline_root
    return arguments


def create_schedule(host: str, cron: str = DEFAULT_CRON, params: dict | None = None,
                    experiment: str = DEFAULT_EXPERIMENT, job_name: str = DEFAULT_JOB_NAME,
                    namespace: str | None = None, service_account: str | None = None,
                    pipeline_root: str | None = None, package_path: str | None = None):
    """Compile ``daily_retrain`` (unless ``package_path`` is given) and create the recurring run on ``host``."""
    import kfp

    from apem_kfp.pipelines.daily_retrain import compile_pipeline

    client = kfp.Client(host=host, namespace=namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    with tempfile.TemporaryDirectory(prefix="apem-schedule-") as tmp:
        package = package_path or compile_pipeline(os.path.join(tmp, "daily_retrain.yaml"))
        return client.create_recurring_run(**recurring_run_arguments(
            package, experiment_id, cron, job_name, params, service_account, pipeline_root,
        ))
