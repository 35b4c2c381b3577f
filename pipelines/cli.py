"""``apem pipeline``: compile, run locally, or schedule the daily retraining pipeline."""

from __future__ import annotations

import argparse
import json
import logging


_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the Kubeflow daily retraining pipeline: compile, run-local, schedule")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    c = actions.add_parser("compile", help="write the pipeline's IR YAML (upload it in the Kubeflow UI)")
    c.add_argument("--out", required=True, help="output YAML file")
    c.set_defaults(handler=run_compile)

    r = actions.add_parser("run-local", help="run the whole pipeline here with kfp.local on synthetic logs")
    r.add_argument("--workdir", default="runs/local", help="where logs, artifacts, MLflow and serving go")
    r.add_argument("--rows", type=int, default=1_000_000, help="synthetic impressions to generate")
    r.add_argument("--days", type=int, default=14, help="days of synthetic logs")
    r.add_argument("--window-days", type=int, default=0, help="training window (0: every generated day)")
    r.add_argument("--run-date", default="", help="last day of the window, YYYY-MM-DD (default: last generated day)")
    r.add_argument("--seed", type=int, default=0, help="seed of the synthetic logs and of training")
    r.add_argument("--epochs", type=int, default=2, help="maximum training epochs")
    r.add_argument("--batch-size", type=int, default=2048, help="rows per training batch")
    r.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    r.add_argument("--model", default="apem", help="model name (see apem train --help)")
    r.add_argument("--model-params", default="{}", help="JSON object of model config overrides")
    r.add_argument("--negative-rate", type=float, default=0.1, help="train-only negative downsampling rate")
    r.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="any other daily_retrain parameter, e.g. --param alpha=0.01 (repeatable)")
    r.set_defaults(handler=run_local_command)

    s = actions.add_parser("schedule", help="create the daily recurring run on a Kubeflow Pipelines host")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    s.add_argument("--cron", default="0 0 2 * * *", help="6-field KFP cron, seconds first (default 02:00 UTC daily)")
    s.add_argument("--experiment", default="apem", help="KFP experiment of the recurring run")
    s.add_argument("--job-name", default="apem-daily-retrain", help="name of the recurring run")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (default: the client's)")
    s.add_argument("--service-account", default="apem-pipeline-runner",
                   help="Kubernetes service account of the runs (infra/: Workload Identity for GCS)")
    s.add_argument("--pipeline-root", default=None, help="e.g. gs://apem-data/pipeline-root (default: the KFP deployment's)")
    s.add_argument("--env", default=None, choices=("dev", "prod"),
                   help="apply this environment's parameters from apem_kfp.pipelines.configs (default: none)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                   help="daily_retrain parameter, e.g. --param epochs=10 (repeatable; wins over --env)")
    s.set_defaults(handler=run_schedule)


def parse_params(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, booleans), else as a string."""
    from apem.cli.errors import CommandError

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def run_compile(args: argparse.Namespace) -> int:
    from apem_kfp.pipelines.daily_retrain import compile_pipeline

    _LOG.info("wrote %s", compile_pipeline(args.out))
    return 0


def run_local_command(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem_kfp.pipelines.local_runner import LocalRunConfig, closing_note, run_local

    if args.rows <= 0 or args.days <= 0 or args.epochs <= 0:
        raise CommandError("--rows, --days and --epochs must be positive")
    try:
        model_params = json.loads(args.model_params)
    except json.JSONDecodeError as err:
        raise CommandError(f"--model-params is not JSON: {err}") from None
    config = LocalRunConfig(
        workdir=args.workdir, rows=args.rows, days=args.days, seed=args.seed, window_days=args.window_days,
        run_date=args.run_date, negative_rate=args.negative_rate, model_name=args.model,
        model_params=model_params, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        extra=parse_params(args.param),
    )
    try:
        result = run_local(config)
    except RuntimeError as err:  # kfp.local: a task failed; its log is printed above
        raise CommandError(str(err).splitlines()[0]) from None
    print(closing_note(result))
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem_kfp.pipelines.configs import environment_parameters
    from apem_kfp.pipelines.kubeflow_runner import create_schedule

    params = {**(environment_parameters(args.env) if args.env else {}), **parse_params(args.param)}
    try:
        run = create_schedule(args.host, args.cron, params=params, experiment=args.experiment,
                              job_name=args.job_name, namespace=args.namespace,
                              service_account=args.service_account, pipeline_root=args.pipeline_root)
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(f"created recurring run {run.recurring_run_id} ({args.job_name}, cron {args.cron!r}) on {args.host}")
    return 0
