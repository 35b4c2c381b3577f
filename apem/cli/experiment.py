"""``apem experiment``: every model x seed on one split; report.json, report.md and plots."""

from __future__ import annotations

import argparse
import logging

from apem.cli.model import add_feature_options, feature_settings
from apem.cli.options import add_overwrite_flag


_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="compare APEM, baselines and ablations over seeds (paper Tables 3-4)")
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory (early stopping)")
    p.add_argument("--test", required=True, help="test dataset directory (scored only)")
    p.add_argument("--models", default="all", help="comma-separated model registry names (apem, shared_bottom, ple, ... "
                   "apem_wo_ld; an unknown name lists them all), or all")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per model")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--epochs", type=int, default=10, help="maximum training epochs per run")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (unless --tuned sets one)")
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience in epochs (val AUC)")
    p.add_argument("--max-rows", type=int, default=None, help="use at most the first N rows of each split (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--oracle", default=None,
                   help="dataset directory holding oracle/truth.parquet for the test rows (default: --test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tuned", default=None,
                   help="JSON written by `apem tune`: each model trains with its chosen hyperparameters")
    add_feature_options(p)
    add_overwrite_flag(p)
    p.set_defaults(handler=run)

    m = sub.add_parser("experiment-merge", help="one report from several `apem experiment` runs over the same split "
                       "(a grid run as several processes)")
    m.add_argument("reports", nargs="+", help="report directories of `apem experiment` (at least two)")
    m.add_argument("--out", required=True, help="report directory of the merged report")
    add_overwrite_flag(m)
    m.set_defaults(handler=run_merge)


def run(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.research.experiment import ExperimentConfig, resolve_model_names, run_experiment
    from apem.research.tuning import read_tuned

    try:
        models = resolve_model_names(args.models)
    except ValueError as err:
        raise CommandError(str(err)) from None
    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CommandError(f"{flag} must be at least 1, got {value}")
    if args.max_rows is not None and args.max_rows < 1:
        raise CommandError(f"--max-rows must be at least 1, got {args.max_rows}")
    features = feature_settings(args)
    try:
        tuned = read_tuned(args.tuned, models) if args.tuned else {}
    except ValueError as err:
        raise CommandError(str(err)) from None
    config = ExperimentConfig(models=models, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, patience=args.patience, max_rows=args.max_rows, device=args.device,
                              num_threads=args.threads, progress=not args.no_progress, tuned=tuned, **features)
    try:
        report = run_experiment(args.train, args.val, args.test, args.out, config, oracle_dir=args.oracle,
                                overwrite=args.overwrite)
    except ValueError as err:
        raise CommandError(str(err)) from None
    failed = sum(len(entry["errors"]) for entry in report["models"].values())
    _LOG.info("wrote %s/report.json and report.md (%d models x %d seeds, %d failed runs)", args.out, len(models),
              args.seeds, failed)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.research.merge_reports import merge_experiment_reports

    try:
        report = merge_experiment_reports(args.reports, args.out, overwrite=args.overwrite)
    except ValueError as err:
        raise CommandError(str(err)) from None
    _LOG.info("wrote %s/report.json and report.md: %d models, %d runs from %d reports", args.out,
              len(report["models"]), report["completed_runs"], len(args.reports))
    return 0
