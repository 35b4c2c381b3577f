"""``apem train``, ``apem evaluate`` and ``apem predict``: the model lifecycle on dataset directories."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os

from apem.cli.options import add_overwrite_flag
from apem.data.atomic import write_text_atomic
from apem.data.ownership import METRICS_FILE, OutputRefused, claim_output

_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a training dataset, early-stopping on a validation dataset")
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory")
    p.add_argument("--model", default="apem", help="registry model name (apem, mmoe, apem_wo_ld, ...)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--epochs", type=int, default=10, help="maximum training epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--patience", type=int, default=2, help="epochs without validation-AUC gain before stopping")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI; logs params, metrics and the model")
    p.add_argument("--negative-rate", type=float, default=None,
                   help="training negative sampling rate (default: from ../split.json next to --train, else 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-loading", choices=("auto", "memory", "streaming"), default="auto",
                   help="memory: encode the whole training set once; streaming: read Parquet row groups "
                        "through a bounded shuffle buffer (bounded memory); auto: streaming from 2M training rows")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader processes that read and encode a streamed training set (0: the trainer itself)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward under bf16 autocast (for GPUs; float32 weights and saved model)")
    add_feature_options(p)
    add_overwrite_flag(p)
    p.set_defaults(handler=run_train)

    scoring_commands = (
        ("evaluate", "per-task metrics of a model on a labelled dataset", "metrics JSON file to write", run_evaluate),
        ("predict", "entire-space funnel probabilities for every row of a dataset",
         "Parquet file to write (id column + p_<label> per step; with labels also funnel_violation: rows "
         "that break the funnel order are scored and marked, never dropped). Labels are optional.", run_predict),
    )
    for name, help_text, out_help, handler in scoring_commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--model", required=True,
                       help="model directory (local or gs://), or a registry URI: models:/apem@champion, models:/apem/3")
        p.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI of the registry, for --model models:/... "
                            "(default: $MLFLOW_TRACKING_URI)")
        p.add_argument("--data", required=True, help="dataset directory")
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument("--no-recalibrate", action="store_true",
                       help="skip the negative-rate recalibration (the model's meta.negative_rate)")
        add_overwrite_flag(p)
        p.set_defaults(handler=handler)


def add_feature_options(p: argparse.ArgumentParser) -> None:
    """--numerical-encoding and the embedding regularisation options (train, experiment, tune)."""
    p.add_argument("--numerical-encoding", default="log_round",
                   help="log_round (the paper's, default) | dense_log | quantile:N; saved with the model")
    p.add_argument("--embedding-l2", type=float, default=0.0,
                   help="weight decay on the embedding rows each batch uses, every field (default 0: off)")
    p.add_argument("--embedding-l2-field", action="append", default=[], metavar="FIELD=COEF",
                   help="per-field embedding weight decay, overriding --embedding-l2 (repeatable)")


def feature_settings(args: argparse.Namespace) -> dict:
    """The parsed feature options as keyword arguments; one CommandError line on bad input."""
    from apem.cli.errors import CommandError
    from apem.data.encoding import parse_numerical_encoding

    per_field = {}
    for item in args.embedding_l2_field:
        name, sep, value = item.partition("=")
        try:
            per_field[name] = float(value) if sep and name else float("nan")
        except ValueError:
            per_field[name] = float("nan")
        if not per_field[name] >= 0:
            raise CommandError(f"--embedding-l2-field {item!r}: expected FIELD=COEF with COEF >= 0")
    if not args.embedding_l2 >= 0:
        raise CommandError(f"--embedding-l2 must be >= 0, got {args.embedding_l2}")
    try:
        parse_numerical_encoding(args.numerical_encoding)
    except ValueError as err:
        raise CommandError(f"--numerical-encoding: {err}") from None
    return {"numerical_encoding": args.numerical_encoding, "embedding_l2": args.embedding_l2,
            "embedding_l2_fields": per_field}


@contextlib.contextmanager
def _opened(model_ref: str, tracking_uri: str | None):
    """The model --model names (a directory or models:/...); bad references are one CommandError line."""
    from apem.cli.errors import CommandError
    from apem.data.spec import DatasetError
    from apem.release.scoring import open_model

    try:
        with open_model(model_ref, tracking_uri) as loaded:
            yield loaded
    except (DatasetError, OutputRefused):  # main() reports these as they are
        raise
    except ValueError as err:  # ModelDirError, an unknown registry model/alias, no tracking URI
        raise CommandError(str(err)) from None


def run_train(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.train.from_dirs import train_from_dirs
    from apem.train.trainer import TrainConfig

    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.patience < 1 or args.loader_workers < 0:
        raise CommandError("--epochs and --batch-size must be >= 1, --lr > 0, --patience >= 1 and --loader-workers >= 0")
    features = feature_settings(args)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, patience=args.patience, num_threads=args.threads,
                         mlflow_tracking_uri=args.mlflow_uri, resume=args.resume,
                         data_loading=args.data_loading, loader_workers=args.loader_workers,
                         precision=args.precision, embedding_l2=features["embedding_l2"], embedding_l2_fields=features["embedding_l2_fields"])
    try:
        summary = train_from_dirs(args.train, args.val, args.out, model_name=args.model, config=config,
                                  negative_rate=args.negative_rate, overwrite=args.overwrite,
                                  numerical_encoding=features["numerical_encoding"])
    except ValueError as err:  # DatasetError is a ValueError too; unknown model, bad device, bad rate
        raise CommandError(str(err)) from None
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"model_dir": summary["model_dir"], "best_epoch": summary["best_epoch"],
                      "best_val_auc_mean": summary["best_val_auc"], "epochs_run": len(summary["history"]),
                      "numerical_encoding": summary["numerical_encoding"], "data_loading": summary["data_loading"],
                      "last_epoch_samples_per_s": last.get("samples_per_s")}, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from apem.eval.metrics import evaluate_predictions
    from apem.release.mlflow_registry import is_registry_uri

    local_model = () if is_registry_uri(args.model) else (args.model,)
    claim_output(args.out, METRICS_FILE, inputs=(*local_model, args.data), overwrite=args.overwrite)
    with _opened(args.model, args.mlflow_uri) as loaded:
        probs, dataset = loaded.predict_dataset(args.data, recalibrate=not args.no_recalibrate)
    metrics = evaluate_predictions(dataset.labels(), probs, dataset.spec.labels)
    metrics.update({"model_dir": args.model if not local_model else os.path.abspath(args.model),
                    "data": os.path.abspath(args.data), "model": loaded.name})
    write_text_atomic(args.out, json.dumps(metrics, indent=2))
    print(json.dumps({name: round(m["auc"], 4) if m["auc"] is not None else None
                      for name, m in metrics["tasks"].items()}))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.data.spec import DatasetError
    from apem.release.scoring import score_dataset

    try:
        summary = score_dataset(args.model, args.data, args.out, tracking_uri=args.mlflow_uri,
                                recalibrate=not args.no_recalibrate, overwrite=args.overwrite)
    except (DatasetError, OutputRefused):  # main() reports these as they are
        raise
    except ValueError as err:  # ModelDirError, an unknown registry model/alias, no tracking URI
        raise CommandError(str(err)) from None
    version = f" (version {summary['registered_version']})" if summary["registered_version"] else ""
    _LOG.info("wrote %d predictions of %s%s to %s", summary["rows"], args.model, version, args.out)
    return 0
