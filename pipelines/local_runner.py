"""Run the whole ``daily_retrain`` pipeline on this machine with ``kfp.local``.

Each task runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``): Beam on the
DirectRunner, MLflow on sqlite, local folders instead of gs://, the CPU instead of a GPU. Raw logs
come from ``apem synth --format events`` (generated once per workdir and configuration).

Layout of the work directory::

    raw/            synthetic raw event partitions dt=YYYY-MM-DD/
    pipeline_root/  kfp.local artifacts of every run (datasets, model, reports, metrics)
    output/         state across runs: validation baseline, reports/<date>/<run id>/ and reports/latest.json
    mlflow/         mlflow.db + artifacts (the registry and its champion alias)
    serving/        the champion's serving copy: v<N>/ and champion.json
    .apem-run.lock  held (``fcntl.flock``) by the one run-local working here; it records the holder's pid

One run at a time per work directory: a second ``run-local`` on a busy workdir is refused at once
with the holder's pid (exit 2) instead of racing the first for the registry, the reports, the
validation baseline and, on a fresh store, MLflow's sqlite schema migration. The lock is released
by the kernel when its holder exits, however it exits (SIGKILL included), so it never goes stale.

Exit codes of ``apem pipeline run-local`` (:func:`exit_code`):

- 0: the run finished; the candidate was promoted, or the gate kept the champion (not blessed, a
  normal daily outcome; the summary says which and why)
- 2: bad arguments, a failed task (its log is printed above), or another run holds the workdir
- 3: the candidate was blessed but its push was refused: the champion moved after the evaluation
  (another run promoted first), so it was not promoted; run again to evaluate against the new champion
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import glob
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field

from apem.data import storage
from apem.data.atomic import remove_stale_staging_under
from apem.release import reports
from apem_kfp.pipelines.kfp_local_compat import resolve_schedule_time_locally

DEFAULT_WORKDIR = os.path.join("runs", "local")
SYNTH_MARKER = "synth_config.json"
LOCK_FILE = ".apem-run.lock"
EXIT_PUSH_REFUSED = 3


@dataclass
class LocalRunConfig:
    workdir: str = DEFAULT_WORKDIR
    rows: int = 1_000_000
    days: int = 14
    seed: int = 0
    window_days: int = 0            # 0: every generated day
    run_date: str = ""              # empty: the last generated day
    negative_rate: float = 0.1
    model_name: str = "apem"
    model_params: dict = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 2048
    lr: float = 1e-3
    registered_model_name: str = "apem"
    bootstrap_resamples: int = 200
    extra: dict = field(default_factory=dict)  # any other daily_retrain parameter


def paths(workdir: str) -> dict[str, str]:
    root = os.path.abspath(workdir)
    return {name: os.path.join(root, name) for name in ("raw", "pipeline_root", "output", "mlflow", "serving")}


def ensure_raw_events(raw_dir: str, rows: int, days: int, seed: int) -> dict:
    """Generate synthetic raw event logs once; regenerate only when the configuration changed."""
    from apem.research.synth import SynthConfig
    from apem.research.synth_events import write_synthetic_events

    wanted = {"rows": rows, "days": days, "seed": seed}
    marker = os.path.join(raw_dir, SYNTH_MARKER)
    if os.path.exists(marker):
        with open(marker) as fh:
            recorded = json.load(fh)
        if recorded.get("config") == wanted:
            return recorded["summary"]
        storage.delete_tree(raw_dir)
    summary = write_synthetic_events(SynthConfig(rows=rows, days=days, seed=seed), raw_dir)
    storage.write_bytes(marker, json.dumps({"config": wanted, "summary": summary}, indent=2).encode())
    return summary


def pipeline_arguments(config: LocalRunConfig, synth_summary: dict) -> dict:
    """The ``daily_retrain`` arguments of a local run."""
    from apem.release.mlflow_registry import sqlite_tracking_uri

    where = paths(config.workdir)
    first_day = dt.date.fromisoformat(synth_summary["first_day"])
    last_day = first_day + dt.timedelta(days=synth_summary["impression_days"] - 1)
    run_date = config.run_date or last_day.isoformat()
    window_days = config.window_days or (dt.date.fromisoformat(run_date) - first_day).days + 1
    return {
        "run_date": run_date,
        "window_days": window_days,
        "raw_uri": where["raw"],
        "output_root": where["output"],
        "negative_rate": config.negative_rate,
        "model_name": config.model_name,
        "model_params": json.dumps(config.model_params),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "mlflow_tracking_uri": sqlite_tracking_uri(where["mlflow"]),
        "registered_model_name": config.registered_model_name,
        "serving_uri": where["serving"],
        "bootstrap_resamples": config.bootstrap_resamples,
        **config.extra,
    }


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``<workdir>/.apem-run.lock`` for the whole run, or refuse at once naming the holder.

    ``flock`` on a descriptor this process alone owns (Python opens it close-on-exec, so the task
    subprocesses do not inherit it): the kernel drops the lock when the holder exits, however it
    exits, so a killed run never leaves a stale lock behind. The file stays; only the lock matters.
    """
    from apem.cli.errors import CommandError

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CommandError(f"{os.path.abspath(workdir)} is in use by another run-local (pid {holder}, "
                               f"lock {path}): wait for it to finish, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def run_local(config: LocalRunConfig) -> dict:
    """Generate logs if needed, run ``daily_retrain`` with kfp.local, and say where everything is.
    Holds the work directory's lock throughout (:func:`workdir_lock`)."""
    with workdir_lock(config.workdir):
        return _run_locked(config)


def _run_locked(config: LocalRunConfig) -> dict:
    from kfp import local

    from apem_kfp.pipelines.daily_retrain import daily_retrain_local

    started = time.monotonic()
    where = paths(config.workdir)
    synth = ensure_raw_events(where["raw"], config.rows, config.days, config.seed)
    generated = time.monotonic()
    arguments = pipeline_arguments(config, synth)
    pointer_before = reports.read_latest(where["output"])
    # an earlier run killed mid-task left staging in its own artifact folder, which no run writes again
    remove_stale_staging_under(where["pipeline_root"])
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=where["pipeline_root"])
    resolve_schedule_time_locally()
    with warnings.catch_warnings():
        # kfp warns that a non-"python" image name may lack Python; the tasks run in this venv
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            daily_retrain_local(**arguments)
        except RuntimeError as err:  # kfp.local cannot run the exit handler: call notify's code here
            write_status(arguments, this_run_report_dir(arguments, pointer_before), "FAILED", str(err))
            raise
    finished = time.monotonic()
    report_dir = this_run_report_dir(arguments, pointer_before)
    write_status(arguments, report_dir, "SUCCEEDED", "")
    seconds = {"generate": round(generated - started, 1), "pipeline": round(finished - generated, 1),
               "total": round(finished - started, 1)}
    return run_summary(config, arguments, report_dir, seconds)


def this_run_report_dir(arguments: dict, pointer_before: dict | None) -> str:
    """The report folder push wrote for this run (``reports/latest.json`` moved during the run; the
    workdir lock rules out another local run moving it), else a fresh one for a run that failed
    before push: ``reports/<date>/local-<UTC time>``."""
    pointer = reports.read_latest(arguments["output_root"])
    if pointer is not None and pointer != pointer_before:
        return pointer["report_dir"]
    run_id = "local-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return reports.run_report_dir(arguments["output_root"], arguments["run_date"], run_id)


def run_summary(config: LocalRunConfig, arguments: dict, report_dir: str, seconds: dict) -> dict:
    """What :func:`closing_note` and :func:`exit_code` need, read from the run's own reports."""
    from apem.release import mlflow_registry

    where = paths(config.workdir)
    with open(os.path.join(report_dir, "push.md")) as fh:
        push_report = fh.read()
    with open(os.path.join(report_dir, "evaluation.json")) as fh:
        evaluation = json.load(fh)
    with open(os.path.join(report_dir, "push.json")) as fh:
        outcome = json.load(fh)
    champion = mlflow_registry.champion_version(arguments["mlflow_tracking_uri"], config.registered_model_name)
    return {
        "arguments": arguments,
        "blessed": evaluation["decision"]["blessed"],
        "pushed": bool(outcome["pushed"]),
        "reasons": outcome["reasons"],
        "champion_version": champion,
        "champion_serving_dir": os.path.join(where["serving"], f"v{champion}") if champion else None,
        "report_dir": report_dir,
        "push_report": push_report,
        "pipeline_root": where["pipeline_root"],
        "statistics_html": latest_artifact(where["pipeline_root"], "validate", "statistics_html"),
        "mlflow_tracking_uri": arguments["mlflow_tracking_uri"],
        "seconds": seconds,
        "config": asdict(config),
    }


def outcome_line(result: dict) -> str:
    """Promoted, kept by the gate, or blessed but refused at push: never "promoted" unless it was."""
    if result["pushed"]:
        return "candidate BLESSED and promoted"
    if result["blessed"]:
        return "candidate BLESSED but its push was REFUSED: NOT promoted (exit code 3)"
    return "candidate NOT promoted"


def exit_code(result: dict) -> int:
    """0 promoted or kept by the gate; 3 blessed but the push was refused (see the module docstring)."""
    return EXIT_PUSH_REFUSED if result["blessed"] and not result["pushed"] else 0


def latest_artifact(pipeline_root: str, task: str, output: str) -> str | None:
    """The newest run's artifact ``<pipeline_root>/<run>/<task>/<output>`` (kfp.local's layout)."""
    found = glob.glob(os.path.join(pipeline_root, "*", task, output))
    return max(found, key=os.path.getmtime) if found else None


def write_status(arguments: dict, folder: str, state: str, error: str) -> str:
    """What the cluster's exit handler does, for a local run: ``status.md`` in the run's report
    ``folder``, and a post to ``webhook_url`` when the run was given one (``--param webhook_url=...``)."""
    from kfp import dsl

    from apem_kfp.components.notify import notify

    os.makedirs(folder, exist_ok=True)
    report = dsl.Markdown(name="status", uri=os.path.join(folder, "status.md"), metadata={})
    failed_task = re.findall(r"Inner task failed: (.*)\.$", strip_ansi(error))
    status = dsl.PipelineTaskFinalStatus(
        state=state, pipeline_job_resource_name="local", error_code=None,
        pipeline_task_name=failed_task[0].strip("'") if failed_task else "", error_message=strip_ansi(error))
    notify.python_func(status=status, run_date=arguments["run_date"], window_days=arguments["window_days"],
                       schedule_time="", webhook_url=arguments.get("webhook_url", ""), report=report)
    return report.path


def strip_ansi(text: str) -> str:
    """kfp.local colours its messages; the report and the webhook get plain text."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def closing_note(result: dict) -> str:
    """Where the champion, the reports and the MLflow store are, and how to browse them."""
    backend = result["mlflow_tracking_uri"]
    lines = [
        f"daily_retrain finished in {result['seconds']['total']}s "
        f"(logs {result['seconds']['generate']}s, pipeline {result['seconds']['pipeline']}s): "
        f"{outcome_line(result)}",
        *[f"  - {reason}" for reason in result["reasons"]],
        f"champion:      version {result['champion_version'] or 'none'}"
        + (f" = models:/{result['config']['registered_model_name']}@champion -> {result['champion_serving_dir']}"
           if result["champion_serving_dir"] else ""),
        f"reports:       {result['report_dir']} (evaluation.json, push.md, push.json, status.md; "
        f"the newest run: {reports.latest_pointer_uri(result['arguments']['output_root'])})",
        f"statistics:    {result['statistics_html'] or 'none'} (TFDV, open in a browser)",
        f"artifacts:     {result['pipeline_root']}",
        f"MLflow store:  {backend}",
        f"browse with:   mlflow ui --backend-store-uri {backend}",
    ]
    return "\n".join(lines)
