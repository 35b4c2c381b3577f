"""Which output paths a command may replace: the one rule that keeps a user's data from being lost.

Every command that writes calls :func:`claim_output` before it does any work. An output may be:

- missing, or an empty directory;
- the kind of output the same command wrote earlier, recognised by its own marker (a model
  directory's ``config.json`` with a ``format_version``, a split's ``split.json``, a dataset's
  ``spec.yaml`` + ``_SUCCESS``, a metrics JSON or predictions Parquet file tagged as ours, ...);
- anything else only with ``overwrite`` (``--overwrite`` on the command line).

Never, not even with ``overwrite``: an output equal to, inside or around one of the command's
inputs; a file where a directory goes or the other way round; a place that cannot be written
(read-only file system, no permission). The refusal is one line naming the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

from apem.data import storage
from apem.data.atomic import remove_stale_staging

PREDICTIONS_TAG = (b"apem.output", b"predictions")


class OutputRefused(ValueError):
    """The output path may not be written; the message names it and says what to do."""


def _read_json(uri: str):
    try:
        return json.loads(storage.read_bytes(uri))
    except (OSError, ValueError):
        return None


def _has_files(*names: str) -> Callable[[str], bool]:
    return lambda uri: all(storage.exists(storage.join(uri, name)) for name in names)


def _is_model_dir(uri: str) -> bool:
    config = _read_json(storage.join(uri, "config.json"))
    return isinstance(config, dict) and "format_version" in config


def _is_metrics_file(uri: str) -> bool:
    metrics = _read_json(uri)
    return isinstance(metrics, dict) and {"tasks", "model_dir"} <= set(metrics)


def _is_predictions_file(uri: str) -> bool:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(uri).metadata or {}
    except Exception:  # pyarrow raises several types for files that are not Parquet
        return False
    return metadata.get(PREDICTIONS_TAG[0]) == PREDICTIONS_TAG[1]


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and how to recognise its own earlier output."""

    name: str
    recognise: Callable[[str], bool]
    is_file: bool = False


MODEL_DIR = OutputKind("a model directory (config.json with format_version)", _is_model_dir)
SPLIT_DIR = OutputKind("a split (split.json)", _has_files("split.json"))
DATASET_DIR = OutputKind(f"a dataset (spec.yaml + {storage.SUCCESS_MARKER})",
                         _has_files("spec.yaml", storage.SUCCESS_MARKER))
QUARANTINE_DIR = OutputKind("an ingest quarantine (ingest.json)", _has_files("ingest.json"))
VALIDATION_DIR = OutputKind("a validation report (anomalies.json)", _has_files("anomalies.json"))
EVENTS_DIR = OutputKind("raw synthetic events (events.json)", _has_files("events.json"))
EXPERIMENT_DIR = OutputKind("an experiment report (report.json)", _has_files("report.json"))
SENSITIVITY_DIR = OutputKind("a sensitivity study (sensitivity.json)", _has_files("sensitivity.json"))
METRICS_FILE = OutputKind("a metrics file written by apem evaluate", _is_metrics_file, is_file=True)
PREDICTIONS_FILE = OutputKind("a predictions file written by apem predict", _is_predictions_file, is_file=True)


def _overlaps(out: str, source: str) -> bool:
    if storage.is_gcs(out) != storage.is_gcs(source):
        return False
    if storage.is_gcs(out):
        a, b = out.rstrip("/") + "/", str(source).rstrip("/") + "/"
    else:
        a, b = os.path.realpath(out) + os.sep, os.path.realpath(source) + os.sep
    return a.startswith(b) or b.startswith(a)


def _check_writable(out: str) -> None:
    """Probe the nearest existing parent with a real write, so a read-only file system or a
    missing permission is found before any work starts."""
    parent = os.path.dirname(os.path.abspath(out))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputRefused(f"{out}: cannot write here ({existing} is a file, not a directory)")
    try:
        os.makedirs(parent, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".apem-write-probe.", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputRefused(f"{out}: cannot write here ({err.strerror or err})") from None


def _check_shape(out: str, kind: OutputKind) -> bool:
    """False when ``out`` is missing or an empty directory; raises for a file/directory mix-up."""
    if storage.is_gcs(out):
        return storage.exists(out)
    if not os.path.lexists(out):
        return False
    if kind.is_file and os.path.isdir(out):
        raise OutputRefused(f"{out}: is a directory; --out needs a file path")
    if not kind.is_file and not os.path.isdir(out):
        raise OutputRefused(f"{out}: is a file, not {kind.name}; remove it or choose another --out")
    return not (os.path.isdir(out) and not os.listdir(out))


def claim_output(out: str, kind: OutputKind, inputs: Iterable[str] = (), overwrite: bool = False) -> None:
    """Raise :class:`OutputRefused` unless ``out`` may be (re)written as ``kind`` (module docstring).
    Locally, also removes staging left behind by a killed earlier writer of ``out``."""
    out = str(out)
    for source in inputs:
        if source and _overlaps(out, str(source)):
            raise OutputRefused(f"{out}: output overlaps the input {source}; choose an --out outside the inputs")
    if not storage.is_gcs(out):
        _check_writable(out)
        remove_stale_staging(out)
    if not _check_shape(out, kind) or overwrite or kind.recognise(out):
        return
    raise OutputRefused(f"{out}: exists and is not {kind.name}; refusing to replace it "
                        "(choose another --out, or pass --overwrite to replace it)")
