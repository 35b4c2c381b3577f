"""The ``apem`` command line. Each subject registers its own subcommands; heavy imports
(torch, TensorFlow, Beam, kfp) happen inside the handlers so ``apem --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it exposes register(subparsers); each handler is set with set_defaults(handler=...)
COMMAND_MODULES = (
    "apem.commands.synth",
    "apem.commands.model",
    "apem.commands.experiment",
    "apem.commands.dataplane",
    "pipelines.cli",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that subject is not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apem.spec import DatasetError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # only commands that forward options (e.g. Beam pipeline options of `split`) accept them
        if not getattr(args, "accepts_unknown_args", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.unknown_args = unknown
    try:
        result = args.handler(args)
    except (CommandError, DatasetError, FileNotFoundError) as err:
        print(f"apem {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
