"""The ``apem`` command line: synthetic logs, the data plane, training, evaluation, experiments.

Each subject registers its own subcommands; heavy imports (torch, TensorFlow, Beam, kfp) happen
inside the handlers so ``apem --help`` stays fast. Subjects outside this package (``apem pipeline``,
from ``apem_kfp.pipelines``) plug in through the ``apem.commands`` entry-point group, so ``apem``
itself never imports the pipeline code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import metadata
from importlib.metadata import entry_points

from apem.cli import dataplane, experiment, logs, model, sensitivity, synth, tune
from apem.cli.errors import CommandError
from apem.cli.options import CommandLineParser
from apem.dataplane.beam_options import ran_a_beam_pipeline

BUILT_IN_SUBJECTS = (synth, model, experiment, tune, sensitivity, dataplane)
PLUGIN_GROUP = "apem.commands"
DESCRIPTION = (
    "APEM multi-step conversion estimation (click -> authorize -> convert): generate synthetic logs, "
    "ingest, validate and split daily event data, train, evaluate and compare multi-task models, "
    "score datasets with a model directory or the MLflow registry's champion, and run the daily "
    "retraining pipeline on Kubeflow. Run `apem COMMAND --help` for a command's options."
)
EPILOG = ("Results go to stdout, progress and diagnostics to stderr. Bad input ends with one line "
          "'apem COMMAND: error: ...' on stderr and exit code 2.")


def package_version() -> str:
    try:
        return metadata.version("apem")
    except metadata.PackageNotFoundError:  # running from a checkout that is not installed
        from apem import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="apem", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=logs.VERBOSE,
                          default=logs.DEFAULT, help="debug messages, other libraries' logs and TensorFlow's")
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=logs.QUIET,
                          help="warnings and errors only (the command's result still goes to stdout)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subject in BUILT_IN_SUBJECTS:
        subject.register(sub)
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apem.data.ownership import OutputRefused
    from apem.data.spec import DatasetError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only commands that forward options (e.g. Beam pipeline options of `split`) accept them
        if not getattr(args, "accepts_unknown_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.unknown_args = unknown
    logs.configure_logging(args.verbosity)
    try:
        result = args.handler(args)
    except (CommandError, DatasetError, OutputRefused, FileNotFoundError) as err:
        print(f"apem {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


def console_main() -> None:
    """The ``apem`` console script: :func:`main`, then exit with its code.

    After a Beam pipeline ran in this process, exit without interpreter teardown: C++ threads still
    alive then (Arrow's pools; once, the gRPC thread of Beam's Prism attempt) can abort a finished
    process during teardown ("terminate called without an active exception", SIGABRT), which turned
    a completed ``apem split`` into exit code 134 (seen once in a fresh-clone suite run). By then
    every output is published and closed; the logs and the standard streams are flushed first. A
    pipeline component's process ends the same way (``beam_options.end_executor_without_teardown``)."""
    code = main()
    if ran_a_beam_pipeline():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
