"""Run the whole ``daily_retrain`` pipeline on this machine with ``kfp.local``.

Each task runs as a subprocess of this Python (``SubprocessRunner(use_venv=False)``): Beam on the
DirectRunner, MLflow on sqlite, local folders instead of gs://, the CPU instead of a GPU. Raw logs
come from ``apem synth --format events`` (generated once per workdir and configuration).

Layout of the work directory::

    raw/            synthetic raw event partitions dt=YYYY-MM-DD/
    pipeline_root/  kfp.local artifacts of every run (datasets, model, reports, metrics)
    output/         state across runs: validation baseline, reports/<date>/{evaluation.json,push.md}
    mlflow/         mlflow.db + artifacts (the registry and its champion alias)
    serving/        the champion's serving copy: v<N>/ and champion.json
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field

from apem.data import storage
from apem_kfp.pipelines.kfp_local_compat import resolve_schedule_time_locally

DEFAULT_WORKDIR = os.path.join("runs", "local")
SYNTH_MARKER = "synth_config.json"


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


def run_local(config: LocalRunConfig) -> dict:
    """Generate logs if needed, run ``daily_retrain`` with kfp.local, and say where everything is."""
    from kfp import local

    from apem.release import mlflow_registry
    from apem_kfp.pipelines.daily_retrain import daily_retrain_local

    started = time.monotonic()
    where = paths(config.workdir)
    synth = ensure_raw_events(where["raw"], config.rows, config.days, config.seed)
    generated = time.monotonic()
    arguments = pipeline_arguments(config, synth)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=where["pipeline_root"])
    resolve_schedule_time_locally()
    with warnings.catch_warnings():
        # kfp warns that a non-"python" image name may lack Python; the tasks run in this venv
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            daily_retrain_local(**arguments)
        except RuntimeError as err:  # kfp.local cannot run the exit handler: call notify's code here
            write_status(arguments, "FAILED", str(err))
            raise
    finished = time.monotonic()

    report_dir = os.path.join(where["output"], "reports", arguments["run_date"])
    write_status(arguments, "SUCCEEDED", "")
    with open(os.path.join(report_dir, "push.md")) as fh:
        push_report = fh.read()
    with open(os.path.join(report_dir, "evaluation.json")) as fh:
        evaluation = json.load(fh)
    champion = mlflow_registry.champion_version(arguments["mlflow_tracking_uri"], config.registered_model_name)
    return {
        "arguments": arguments,
        "blessed": evaluation["decision"]["blessed"],
        "reasons": evaluation["decision"]["reasons"],
        "champion_version": champion,
        "champion_serving_dir": os.path.join(where["serving"], f"v{champion}") if champion else None,
        "report_dir": report_dir,
        "push_report": push_report,
        "pipeline_root": where["pipeline_root"],
        "statistics_html": latest_artifact(where["pipeline_root"], "validate", "statistics_html"),
        "mlflow_tracking_uri": arguments["mlflow_tracking_uri"],
        "seconds": {"generate": round(generated - started, 1), "pipeline": round(finished - generated, 1),
                    "total": round(finished - started, 1)},
        "config": asdict(config),
    }


def latest_artifact(pipeline_root: str, task: str, output: str) -> str | None:
    """The newest run's artifact ``<pipeline_root>/<run>/<task>/<output>`` (kfp.local's layout)."""
    found = glob.glob(os.path.join(pipeline_root, "*", task, output))
    return max(found, key=os.path.getmtime) if found else None


def write_status(arguments: dict, state: str, error: str) -> str:
    """What the cluster's exit handler does, for a local run: ``reports/<run date>/status.md``, and a
    post to ``webhook_url`` when the run was given one (``--param webhook_url=...``)."""
    from kfp import dsl

    from apem_kfp.components.notify import notify

    folder = os.path.join(arguments["output_root"], "reports", arguments["run_date"])
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
        f"candidate {'BLESSED and promoted' if result['blessed'] else 'NOT promoted'}",
        *[f"  - {reason}" for reason in result["reasons"]],
        f"champion:      version {result['champion_version'] or 'none'}"
        + (f" = models:/{result['config']['registered_model_name']}@champion -> {result['champion_serving_dir']}"
           if result["champion_serving_dir"] else ""),
        f"reports:       {result['report_dir']} (evaluation.json, push.md, status.md)",
        f"statistics:    {result['statistics_html'] or 'none'} (TFDV, open in a browser)",
        f"artifacts:     {result['pipeline_root']}",
        f"MLflow store:  {backend}",
        f"browse with:   mlflow ui --backend-store-uri {backend}",
    ]
    return "\n".join(lines)
