"""The ``apem`` command line: synthetic logs, the data plane, training, evaluation, experiments.

Each subject registers its own subcommands; heavy imports (torch, TensorFlow, Beam, kfp) happen
inside the handlers so ``apem --help`` stays fast. Subjects outside this package (``apem pipeline``,
from ``apem_kfp.pipelines``) plug in through the ``apem.commands`` entry-point group, so ``apem``
itself never imports the pipeline code.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from apem.cli import dataplane, experiment, model, synth, tune
from apem.cli.errors import CommandError

BUILT_IN_SUBJECTS = (synth, model, experiment, tune, dataplane)
PLUGIN_GROUP = "apem.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apem", description=__doc__.splitlines()[0])
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
    try:
        result = args.handler(args)
    except (CommandError, DatasetError, OutputRefused, FileNotFoundError) as err:
        print(f"apem {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
