"""Options and help formatting shared by every command."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, except where the help already has its own
    ``(default ...)``, for required options and for on/off flags (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.required or action.nargs == 0 or action.default is argparse.SUPPRESS:
            return text
        if action.default is None or action.default == []:  # unset: the help says what happens then
            return text + " (default: none)"
        return super()._get_help_string(action)


class CommandParsers(argparse._SubParsersAction):
    """Subcommands that show their defaults and say what they do: ``apem COMMAND --help`` opens with
    the command's one-line help unless it has a description of its own."""

    def add_parser(self, name, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if "help" in kwargs:
            kwargs.setdefault("description", kwargs["help"])
        return super().add_parser(name, **kwargs)


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose subcommands (at every depth) are :class:`CommandParsers`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("action", CommandParsers)
        return super().add_subparsers(**kwargs)


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is not this command's own earlier output "
                             "(never allowed when --out overlaps an input)")
