"""``apem tune``: the same trial budget for every model, scored on the validation split only."""

from __future__ import annotations

import argparse
import json
import logging


_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="fair budgeted hyperparameter search per model on validation (Optuna TPE)")
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory (the only split scored)")
    p.add_argument("--models", default="apem", help="comma-separated registry names, or all")
    p.add_argument("--trials", type=int, default=8, help="trials per model (the same for every model)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (early stopping on val AUC)")
    p.add_argument("--patience", type=int, default=1, help="epochs without validation-AUC gain before a trial stops")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training batch")
    p.add_argument("--seed", type=int, default=0, help="sampler and training seed")
    p.add_argument("--max-rows", type=int, default=None, help="use at most the first N rows of each split (default: all)")
    p.add_argument("--encodings", default="log_round,dense_log,quantile:32",
                   help="numerical encodings to search over, comma-separated")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI: one run per model, one nested run per trial (default: no tracking)")
    p.add_argument("--out", required=True, help="JSON of the chosen hyperparameters (read by apem experiment --tuned)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.research.experiment import resolve_model_names
    from apem.research.tuning import TuneConfig, run_tuning

    for flag, value in (("--trials", args.trials), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--patience", args.patience)):
        if value < 1:
            raise CommandError(f"{flag} must be at least 1, got {value}")
    try:
        config = TuneConfig(models=resolve_model_names(args.models), trials=args.trials, epochs=args.epochs,
                            patience=args.patience, batch_size=args.batch_size, seed=args.seed,
                            max_rows=args.max_rows, device=args.device, num_threads=args.threads,
                            encodings=tuple(e.strip() for e in args.encodings.split(",") if e.strip()),
                            mlflow_tracking_uri=args.mlflow_uri)
        result = run_tuning(args.train, args.val, args.out, config)
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(json.dumps({name: {"best": entry["best"], "val_auc_mean": round(entry["best_val_auc_mean"], 4)}
                      for name, entry in result["models"].items()}, indent=2))
    _LOG.info("wrote %s (%d trials x %d models)", args.out, config.trials, len(config.models))
    return 0
