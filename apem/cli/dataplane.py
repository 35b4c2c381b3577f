"""``apem ingest``, ``apem validate`` and ``apem split``: the data plane of the daily pipeline."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging

from apem.cli.options import add_overwrite_flag


_LOG = logging.getLogger(__name__)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 8,1,1, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive numbers like 8,1,1, got {text!r}")
    return values


def add_engine_flags(p: argparse.ArgumentParser, what: str, memory: str) -> None:
    p.add_argument("--engine", choices=("local", "beam"), default="local",
                   help=f"local: {what} in this process (the default: faster on one machine; {memory}); "
                        f"beam: {what} as an Apache Beam pipeline, for windows that outgrow one machine "
                        "(Dataflow, Flink, Spark by --runner and options)")
    p.add_argument("--runner", default="DirectRunner", help="Beam runner with --engine beam (DirectRunner, "
                   "DataflowRunner, ...)")


def beam_args(args: argparse.Namespace) -> list[str]:
    """The Beam pipeline options of a command line; they need ``--engine beam``."""
    from apem.cli.errors import CommandError

    unknown = list(getattr(args, "unknown_args", []))
    if unknown and args.engine != "beam":
        raise CommandError(f"unrecognized arguments: {' '.join(unknown)} (Beam options need --engine beam)")
    return unknown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="join raw daily event partitions into a funnel dataset (+ quarantine)",
                       epilog="With --engine beam, unknown options are passed to Beam as pipeline options, e.g. "
                              "--direct_num_workers=4, or --project/--region/--temp_location for Dataflow.")
    p.add_argument("--raw", required=True, help="raw event root (local or gs://) with dt=YYYY-MM-DD/ partitions")
    p.add_argument("--start", required=True, type=_date, help="first day, YYYY-MM-DD")
    p.add_argument("--end", required=True, type=_date, help="last day, YYYY-MM-DD (inclusive)")
    p.add_argument("--out", required=True, help="output dataset (local or gs://); quarantine goes to OUT_quarantine")
    p.add_argument("--attribution-days", type=int, default=3, help="follow-up events later than this are quarantined")
    p.add_argument("--allow-missing-days", action="store_true", help="skip missing or empty partitions")
    p.add_argument("--file-format", choices=("jsonl", "csv", "parquet"), default=None,
                   help="read only files of this format (default: by file extension)")
    p.add_argument("--stage-memory-mb", type=int, default=None,
                   help="--engine local: memory for the checked impressions while the later days are read "
                        "(estimated; ~530 MB for 1M impressions); beyond it they wait on disk in OUT's "
                        "staging, slower but bounded (default: 768, STAGE_MEMORY_BYTES in apem.dataplane.ingest)")
    add_engine_flags(p, "ingest", "memory: a day's events plus --stage-memory-mb, 2.9 GB at 10M impressions, "
                     "where Beam's DirectRunner outgrew 21 GB: benchmarks/bench_ingest.py")
    add_overwrite_flag(p)
    p.set_defaults(handler=run_ingest, accepts_unknown_args=True)

    p = sub.add_parser("validate", help="TFDV statistics, schema anomalies and drift; non-zero exit on anomalies")
    p.add_argument("--data", required=True, help="dataset directory (local or gs://)")
    p.add_argument("--schema", default=None, help="schema .pbtxt (default: the curated one in apem/resources)")
    p.add_argument("--out", required=True, help="report directory: stats.pb, anomalies.md, anomalies.json")
    p.add_argument("--baseline-stats", default=None, help="previous window's stats.pb, for the drift check (default: no drift check)")
    p.add_argument("--warn-only", action="store_true", help="report anomalies but exit 0")
    add_engine_flags(p, "statistics", "from one DataFrame below 2M rows, batch by batch above: 2.0 GB at 10M "
                     "rows, where the DataFrame took 6.6 GB")
    add_overwrite_flag(p)
    p.set_defaults(handler=run_validate, accepts_unknown_args=True)

    p = sub.add_parser("split", help="Beam: chronological train/val/test split with negative downsampling in train",
                       epilog="Unknown options are passed to Beam as pipeline options, e.g. "
                              "--direct_num_workers=4, or --project/--region/--temp_location for Dataflow.")
    p.add_argument("--data", required=True, help="dataset directory (local or gs://)")
    p.add_argument("--out", required=True, help="output root: OUT/train, OUT/val, OUT/test, OUT/split.json")
    p.add_argument("--neg-rate", type=float, default=1.0, help="keep rate R of train rows whose first step is 0")
    p.add_argument("--ratios", type=_ratios, default=(8, 1, 1), help="train,val,test day shares (default 8,1,1)")
    p.add_argument("--runner", default="DirectRunner", help="Beam runner (DirectRunner, DataflowRunner, ...)")
    add_overwrite_flag(p)
    p.set_defaults(handler=run_split, accepts_unknown_args=True)


def run_ingest(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.dataplane.ingest import IngestError, ingest

    options = dict(attribution_window_days=args.attribution_days, allow_missing_days=args.allow_missing_days,
                   file_format=args.file_format, overwrite=args.overwrite)
    pipeline_args = beam_args(args)
    try:
        if args.engine == "beam":
            from apem.dataplane.ingest_beam import ingest_beam

            summary = ingest_beam(args.raw, args.start, args.end, args.out, runner=args.runner,
                                  pipeline_args=pipeline_args, **options)
        else:
            staged = {} if args.stage_memory_mb is None else {"stage_memory_bytes": args.stage_memory_mb * 2**20}
            summary = ingest(args.raw, args.start, args.end, args.out, **options, **staged)
    except IngestError as err:
        raise CommandError(str(err)) from None
    print(json.dumps(summary, indent=2))
    _LOG.info("wrote %s rows to %s; quarantined %s %s to %s", summary["rows"], summary["dataset"],
              summary["quarantined"], {k: v for k, v in summary["quarantine"].items() if v}, summary["quarantine_path"])
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from apem.dataplane.validation import DEFAULT_SCHEMA, ValidationFailed, validate_dataset

    from apem.dataplane.validation_beam import statistics_for

    statistics = statistics_for(args.engine, args.runner, beam_args(args))
    try:
        result = validate_dataset(args.data, schema_path=args.schema or DEFAULT_SCHEMA, out_dir=args.out,
                                  baseline_stats=args.baseline_stats, warn_only=args.warn_only,
                                  overwrite=args.overwrite, statistics=statistics)
    except ValidationFailed as err:
        _LOG.error("apem validate: %s", err)
        return 1
    _LOG.info("%s; report %s, stats %s", result["summary"], result["report_path"], result["stats_path"])
    return 0


def run_split(args: argparse.Namespace) -> int:
    from apem.cli.errors import CommandError
    from apem.data.split_record import check_negative_rate
    from apem.dataplane.split import SplitError, split_dataset

    check_negative_rate(args.neg_rate, CommandError)
    try:
        summary = split_dataset(args.data, args.out, negative_rate=args.neg_rate, ratios=args.ratios,
                                runner=args.runner, pipeline_args=list(getattr(args, "unknown_args", [])), overwrite=args.overwrite)
    except SplitError as err:
        raise CommandError(str(err)) from None
    print(json.dumps(summary, indent=2))
    return 0
