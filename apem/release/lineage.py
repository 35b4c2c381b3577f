"""Where a registered version comes from: the tags each version carries in the MLflow registry.

``apem.git_sha`` (the code), ``apem.kfp_run_id`` (the pipeline run), ``apem.data_window`` and
``apem.split`` (the days and the ``split.json`` it trained and was tested on: boundaries, negative
rate) and ``apem.verdict`` (the evaluation's decision and reasons).
"""

from __future__ import annotations

import json
import os
import subprocess

from apem.data.spec import read_dataset
from apem.data.split_record import read_split_record
from apem.eval.comparison import render_report
from apem.inference.model_dir import feature_frame

GIT_SHA_VARIABLE = "APEM_GIT_SHA"  # set in the image at build time (Dockerfile ARG), where there is no .git
TAG_LIMIT = 5000  # MLflow's limit on a tag value


def git_sha() -> str:
    """The commit of the running code: ``$APEM_GIT_SHA``, else ``git rev-parse HEAD`` beside the source."""
    if os.environ.get(GIT_SHA_VARIABLE):
        return os.environ[GIT_SHA_VARIABLE]
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def lineage_tags(split_record: dict, kfp_run_id: str, decision: dict) -> dict[str, str]:
    """The version tags of a candidate trained on ``split_record``'s days in pipeline run ``kfp_run_id``."""
    boundaries = split_record.get("boundaries", {})
    days = [day for pair in boundaries.values() for day in pair]
    verdict = {"blessed": bool(decision.get("blessed")), "reasons": decision.get("reasons", [])}
    return {
        "apem.git_sha": git_sha(),
        "apem.kfp_run_id": kfp_run_id or "none",
        "apem.data_window": f"{min(days)}..{max(days)}" if days else "unknown",
        "apem.split": json.dumps(split_record, sort_keys=True, default=str)[:TAG_LIMIT],
        "apem.verdict": json.dumps(verdict)[:TAG_LIMIT],
    }


def registration_for(splits_dir: str, evaluation: dict, kfp_run_id: str, training_run_id: str | None,
                     example_rows: int = 5) -> dict:
    """What push adds to the registration of a candidate (``apem.release.push.push``'s ``registration``):
    the training run to log into, an input example (rows of ``splits/test``), the lineage tags, and
    the evaluation report and JSON as artifacts of the run."""
    test = read_dataset(os.path.join(splits_dir, "test"))
    return {
        "run_id": training_run_id or None,
        "input_example": feature_frame(test.table, test.spec.features, example_rows),
        "version_tags": lineage_tags(read_split_record(splits_dir), kfp_run_id, evaluation["decision"]),
        "texts": {"evaluation/report.md": render_report(evaluation),
                  "evaluation/evaluation.json": json.dumps(evaluation, indent=2, default=float)},
    }
