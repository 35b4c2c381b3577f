"""notify: the exit handler. Writes the run's final status and posts it to an optional webhook."""

from kfp import dsl
from kfp.dsl import Markdown, Output, PipelineTaskFinalStatus

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def notify(
    status: PipelineTaskFinalStatus,
    run_date: str,
    window_days: int,
    schedule_time: str,
    webhook_url: str,
    report: Output[Markdown],
):
    """Runs after every other task, whatever their outcome (``dsl.ExitHandler``). ``report`` says
    whether the run succeeded and, if not, which task failed with which error, with the run id and
    the data window (computed as ingest does, from ``run_date``/``window_days``/``schedule_time``).
    The same text goes to ``webhook_url`` as Slack-style JSON when it is set. A webhook that
    cannot be reached is logged, not raised: the alert must not turn a good run red.
    """
    import logging

    from apem.dataplane.window import training_window
    from apem.release.alerts import RunStatus, post_webhook, render_status

    try:
        start, end = training_window(run_date, window_days, schedule_time)
        window = (start.isoformat(), end.isoformat())
    except ValueError as err:  # the bad parameter that may be why the run failed
        window = ("?", f"? ({err})")
    run_status = RunStatus(state=status.state, run_id=status.pipeline_job_resource_name,
                           task=status.pipeline_task_name, error_code=status.error_code,
                           error_message=status.error_message or "", window=window)
    text = render_status(run_status, "apem-daily-retrain")
    with open(report.path, "w") as fh:
        fh.write(text)
    report.metadata.update({"state": status.state, "posted": False})
    try:
        code = post_webhook(webhook_url, text)
        report.metadata["posted"] = code is not None
    except OSError as err:
        logging.getLogger("apem.notify").error("webhook %s not reached: %s", webhook_url, err)
    print(text)
