"""``apem sensitivity``: APEM's K x L grid trained on train, scored on validation only, speed beside AUC."""

from __future__ import annotations

import argparse
import logging

from apem.cli.model import add_feature_options, feature_settings
from apem.cli.options import add_overwrite_flag


_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="K (inducing points) x L (layers) sensitivity of APEM on validation, "
                                           "with s/epoch and parameters")
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory (the only split scored)")
    p.add_argument("--model", default="apem", help="a registry model with K and L (apem or an APEM ablation)")
    p.add_argument("--k", default="16,32,64", help="inducing points K to try, comma-separated")
    p.add_argument("--l", default="1,2,4", help="layers L to try, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per (K, L) cell")
    p.add_argument("--epochs", type=int, default=2, help="maximum epochs per run (early stopping on val AUC)")
    p.add_argument("--patience", type=int, default=1, help="epochs without validation-AUC gain before a run stops")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--max-rows", type=int, default=None, help="use at most the first N rows of each split (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tuned", default=None,
                   help="JSON written by `apem tune`: every cell trains with the model's chosen hyperparameters "
                        "(lr, embedding_l2, numerical encoding, ...), K and L excepted")
    p.add_argument("--out", required=True, help="directory for sensitivity.json and sensitivity.md")
    add_feature_options(p)
    add_overwrite_flag(p)
    p.set_defaults(handler=run)


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    from apem.cli.errors import CommandError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"{flag} expects comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.research.sensitivity import SensitivityConfig, run_sensitivity
    from apem.research.tuning import read_tuned

    if args.max_rows is not None and args.max_rows < 1:
        raise CommandError(f"--max-rows must be at least 1, got {args.max_rows}")
    try:
        tuned = read_tuned(args.tuned, [args.model]).get(args.model, {}) if args.tuned else {}
    except ValueError as err:
        raise CommandError(str(err)) from None
    config = SensitivityConfig(model=args.model, inducing_points=_int_list("--k", args.k),
                               layers=_int_list("--l", args.l), seeds=args.seeds, epochs=args.epochs,
                               patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                               max_rows=args.max_rows, device=args.device, num_threads=args.threads,
                               tuned=tuned, **feature_settings(args))
    try:
        config.check()
        result = run_sensitivity(args.train, args.val, args.out, config, log=_LOG.info, overwrite=args.overwrite)
    except ValueError as err:
        raise CommandError(str(err)) from None
    _LOG.info("wrote %s/sensitivity.json and sensitivity.md (%d cells x %d seeds)", args.out,
              len(result["cells"]), config.seeds)
    return 0
