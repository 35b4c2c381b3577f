"""Options shared by every command that writes."""

from __future__ import annotations

import argparse


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is not this command's own earlier output "
                             "(never allowed when --out overlaps an input)")
