"""Workaround: import TFDV (and with it TensorFlow) without its import noise on stderr.

TensorFlow writes from C++ straight to file descriptor 2 while it loads: "Unable to register
cuFFT/cuDNN/cuBLAS factory" (E level, even on machines without a GPU), the cpu_feature_guard and
oneDNN notices (I), "TF-TRT Warning" (W) and absl's pre-initialisation lines. Only the environment
read at import time silences them, so :func:`import_tfdv` sets ``TF_CPP_MIN_LOG_LEVEL=3`` and
``GRPC_VERBOSITY=ERROR`` right before the one import, whichever entry point got here (``apem
validate``, the validate component in KFP, a library caller). Values already in the environment win:
``apem --verbose`` sets ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything. ``TF_ENABLE_ONEDNN_OPTS`` is
left alone: it changes TensorFlow's kernels, not only its messages, and its notice is an I-level
line that the log level already hides.

TFDV itself prints "Unable to import IPython ... visualization APIs will not function" with
``sys.stderr.write`` at import (the image has no IPython, and ``get_statistics_html`` does not need
it); that one text is kept out of stderr and logged at DEBUG, everything else written meanwhile
passes through. ``tests/dataplane/test_quiet_tensorflow.py``
is the canary: it fails when TFDV stops printing that line (drop the redirect then).

This module is the only place that imports TFDV or TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_LOG = logging.getLogger(__name__)
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
TFDV_IPYTHON_NOTICE = "Unable to import IPython"


class _WithoutNotice:
    """A stderr that drops TFDV's IPython notice (to the DEBUG log) and passes on everything else."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if TFDV_IPYTHON_NOTICE in text:
            _LOG.debug("tensorflow_data_validation: %s", text.strip())
            return len(text)
        return self._stream.write(text)

    def close(self) -> None:
        """Flush only: the stream is not the wrapper's to close. Logging handlers created while TFDV
        imported (absl's among them) keep this wrapper as their stream, and ``logging.shutdown()``
        closes them; absl's handler closes any stream that is not ``sys.stderr`` itself and not a
        terminal, so forwarding ``close`` closed the real stderr (``apem validate --engine beam``, whose
        exit flushes stderr after ``logging.shutdown()``, then exited 1 with "lost sys.stderr")."""
        if not self._stream.closed:
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def quiet_environment() -> None:
    """The variables TensorFlow reads at import, unless the caller set them already."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def import_tfdv():
    """``tensorflow_data_validation``, imported (once) without TensorFlow's or TFDV's notices on stderr."""
    quiet_environment()
    with contextlib.redirect_stderr(_WithoutNotice(sys.stderr)):
        import tensorflow_data_validation as tfdv
    return tfdv
