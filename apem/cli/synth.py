"""``apem synth``: synthetic financial-service funnel logs with known truth."""

from __future__ import annotations

import argparse
import json
import logging

from apem.cli.options import add_overwrite_flag


_LOG = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic dataset (or raw event logs) with known truth")
    p.add_argument("--rows", type=int, default=300_000, help="impressions to generate")
    p.add_argument("--days", type=int, default=30, help="days the impressions spread over")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--funnel", choices=("financial3", "sparse2"), default="financial3",
                   help="financial3: click -> authorize -> convert; sparse2: Ali-CCP-like click -> convert "
                        "(CTR ~4%%, convert | click <1%%; dataset format only)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("dataset", "events"), default="dataset",
                   help="dataset: Parquet + spec.yaml; events: raw daily event-log partitions dt=YYYY-MM-DD/")
    p.add_argument("--events-file-format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                   help="file format of raw event partitions (with --format events)")
    add_overwrite_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.research.synth import SynthConfig, write_synthetic_dataset

    if args.rows <= 0 or args.days <= 0:
        raise CommandError("--rows and --days must be positive")
    if args.funnel != "financial3" and args.format == "events":
        raise CommandError("--format events writes the financial3 funnel only; use --format dataset with --funnel sparse2")
    config = SynthConfig(rows=args.rows, days=args.days, seed=args.seed, funnel=args.funnel)
    if args.format == "events":
        from apem.research.synth_events import write_synthetic_events

        summary = write_synthetic_events(config, args.out, file_format=args.events_file_format,
                                         overwrite=args.overwrite)
    else:
        summary = write_synthetic_dataset(config, args.out, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    _LOG.info("wrote %d rows (%s) to %s", args.rows, args.format, args.out)
    return 0
