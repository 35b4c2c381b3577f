"""Where a pipeline run keeps its reports: one folder per run, and a pointer to the newest.

Layout under ``<output_root>/reports/``::

    <report date>/<run id>/   evaluation.json, push.md, push.json, status.md (what that run wrote)
    latest.json               {"run_id", "report_date", "report_dir", "updated_at"} of the newest run

Two runs on the same report date each keep their own folder, so one never overwrites the other's
record. ``latest.json`` is replaced atomically (``storage.write_bytes``): a reader sees the old
pointer or the new one, never a partial file.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from apem.data import storage

LATEST_POINTER = "latest.json"
UNDATED = "undated"


def safe_run_id(run_id: str) -> str:
    """A run id usable as one path segment: KFP ids are UUIDs, but a placeholder left unresolved
    or a hand-made id may hold ``/`` or ``{}``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id or "").strip("._")
    return cleaned or "unknown-run"


def run_report_dir(output_root: str, report_date: str, run_id: str) -> str:
    """``<output_root>/reports/<report date>/<run id>``."""
    return storage.join(output_root, "reports", report_date or UNDATED, safe_run_id(run_id))


def latest_pointer_uri(output_root: str) -> str:
    return storage.join(output_root, "reports", LATEST_POINTER)


def point_latest(output_root: str, report_date: str, run_id: str) -> dict:
    """Make ``reports/latest.json`` name this run's report folder (atomic replace)."""
    pointer = {
        "run_id": safe_run_id(run_id), "report_date": report_date or UNDATED,
        "report_dir": run_report_dir(output_root, report_date, run_id),
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    }
    storage.write_bytes(latest_pointer_uri(output_root), json.dumps(pointer, indent=2).encode())
    return pointer


def write_run_reports(output_root: str, report_date: str, run_id: str, files: dict[str, bytes]) -> str:
    """Write ``files`` (name -> content, each atomically) into the run's folder, then point
    ``latest.json`` at it; returns the folder."""
    folder = run_report_dir(output_root, report_date, run_id)
    for name, content in files.items():
        storage.write_bytes(storage.join(folder, name), content)
    point_latest(output_root, report_date, run_id)
    return folder


def read_latest(output_root: str) -> dict | None:
    """The pointer written by :func:`point_latest`, or None before the first run."""
    uri = latest_pointer_uri(output_root)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))
