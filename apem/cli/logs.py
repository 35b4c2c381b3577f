"""Where the command line's diagnostics go: ``logging`` to stderr, at the level --verbose/--quiet pick.

stdout carries only a command's result (the JSON summary of ``apem train``, say); progress and
diagnostics are log records on stderr. Records of ``apem`` and ``apem_kfp`` show from INFO (from
WARNING with ``--quiet``, from DEBUG with ``--verbose``). Other libraries' records (Beam's
"crcmod package not found", Python warnings such as google.api_core's end-of-life notice) show
only from ERROR, and everything from INFO with ``--verbose``. TensorFlow's C++ import noise is
kept out by the environment (``apem.dataplane.quiet_tensorflow``); ``--verbose`` lets it through.
"""

from __future__ import annotations

import logging
import os
import sys

OWN_LOGGERS = ("apem", "apem_kfp")
QUIET, DEFAULT, VERBOSE = -1, 0, 1
OWN_LEVEL = {QUIET: logging.WARNING, DEFAULT: logging.INFO, VERBOSE: logging.DEBUG}
OTHERS_LEVEL = {QUIET: logging.ERROR, DEFAULT: logging.ERROR, VERBOSE: logging.INFO}


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (a test's captured stream, a redirected one)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _ThirdPartyThreshold(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_LOGGERS
        return own or record.levelno >= self.level


_installed: list[logging.Handler] = []


def configure_logging(verbosity: int = DEFAULT) -> None:
    """Route log records (and Python warnings) to stderr for one ``apem`` invocation; calling it
    again replaces the handler it installed before, never anyone else's."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
    _installed.clear()
    handler = _StderrHandler()
    handler.addFilter(_ThirdPartyThreshold(OTHERS_LEVEL[verbosity]))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbosity == VERBOSE else "%(message)s"))
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(min(OTHERS_LEVEL[verbosity], logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(OWN_LEVEL[verbosity])
    logging.captureWarnings(True)  # warnings become records of "py.warnings": third-party, filtered
    if verbosity == VERBOSE:  # TensorFlow reads this at import; a value the user set wins
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
