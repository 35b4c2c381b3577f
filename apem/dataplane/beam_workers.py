"""Beam DirectRunner workers that die with the process that started them.

Library workaround (canary: tests/dataplane/test_beam_workers.py). Beam's multi-process
DirectRunner starts each SDK worker with ``/bin/sh -c "<python> -m
apache_beam.runners.worker.sdk_worker_main"``. Killed with SIGKILL, the launching ``apem split``
cannot stop them, and they linger until their gRPC channel times out (80 s and more seen), still
holding CPU and memory. Beam offers no option for this, but it accepts any subprocess environment:

- :func:`direct_runner` is Beam's own ``FnApiRunner`` (what the DirectRunner uses for a batch
  pipeline) with the default environment of the multi-process mode, except that the command is
  ``exec <python> -m apem.dataplane.beam_workers --parent <pid>``: ``exec`` makes the worker a
  direct child of the launcher, not of a shell;
- :func:`main`, the worker's entry point, asks the kernel to SIGKILL it when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, Linux), checks that the parent is still the launcher (it may have
  died before the request), then runs Beam's ``sdk_worker_main`` unchanged.

What this guarantees: once a worker has started, a SIGKILL of the launcher alone kills it at once.
Killing the launcher's whole process group (``kill -9 -PGID``, Ctrl-C, a container stop) kills
everything without help. Elsewhere than Linux, the workers are Beam's own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WORKER_MODULE = "apem.dataplane.beam_workers"
MODE_OPTION = "--direct_running_mode"
WORKERS_OPTION = "--direct_num_workers"


class _DropWorkerModeWarning(logging.Filter):
    """FnApiRunner warns that ``direct_num_workers`` > 1 wants the multi-process mode; that is what
    :func:`direct_runner` provides, through its environment rather than the mode option."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "direct_num_workers" not in record.getMessage()


def applies(runner: str, pipeline_args: list[str]) -> bool:
    """Our workers replace Beam's default multi-process mode only: on Linux, for the DirectRunner,
    when the options choose no running mode themselves."""
    return (runner == "DirectRunner" and sys.platform.startswith("linux")
            and not any(a.startswith(MODE_OPTION) for a in pipeline_args))


def batch_runner():
    """Beam's FnApiRunner, which the DirectRunner runs a batch pipeline on, for the modes :func:`direct_runner` does
    not replace (``--direct_running_mode`` given). Beam 2.72's DirectRunner first tries its Prism runner, which
    downloads a binary from GitHub at run time (no network here: it fails and falls back) and leaves a gRPC thread
    that aborted the process at exit ("terminate called without an active exception"): 2 of ~20 ``apem pipeline
    run-local`` runs failed in split that way, after it had written its outputs. Beam has no option to skip Prism
    (canary: tests/dataplane/test_beam_workers.py)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def direct_runner():
    """Beam's FnApiRunner with subprocess workers that die with this process (as many as the
    pipeline options' ``--direct_num_workers`` say)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").addFilter(_DropWorkerModeWarning())
    command = f"exec {shlex.quote(sys.executable)} -m {WORKER_MODULE} --parent {os.getpid()}"
    environment = SubprocessSDKEnvironment.from_command_string(command_string=command)
    return FnApiRunner(default_environment=environment)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent exits; exit now if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the launcher died before the request: nobody will read our output
        os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[1] == "--parent":
        die_with_parent(int(argv[2]))
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(argv[:1])


if __name__ == "__main__":
    main(sys.argv)
