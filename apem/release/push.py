"""Push a blessed candidate: register it, make it the champion, publish its serving copy.

If the evaluation blessed the candidate:
  1. register a new version of the model in MLflow (``apem.release.mlflow_registry``),
  2. copy the serving export (the model directory, loadable by ``apem.inference.model_dir.load_model`` and by
     the registered pyfunc) to ``<serving_uri>/v<version>`` with ``apem.data.storage.copy_tree``
     (local or gs://, atomic),
  3. move the registry alias ``champion`` to the new version,
  4. write ``<serving_uri>/champion.json`` naming the version and its path, so servers that
     watch the serving location find it without asking MLflow.
The alias moves only after the serving copy succeeded, so it never points at a version whose
files are missing.

If not blessed, nothing changes: no version, no alias move, no copy; the reasons are returned.
The push also refuses when the champion moved after the evaluation (another run pushed in
between), since the evaluation then compared against a model that no longer serves.

Push is idempotent, so the pipeline may retry it: each version carries the tag
``apem.candidate_digest`` (SHA-256 of the model directory's files). A re-executed push of the same
candidate finds that version instead of registering another one; if the alias already points at
it, nothing moves again; if an earlier attempt stopped before the alias moved, it finishes the job.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone

from apem.data import storage
from apem.release import mlflow_registry

SERVING_POINTER = "champion.json"
DIGEST_TAG = "apem.candidate_digest"


def model_dir_digest(model_dir: str) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``model_dir``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, model_dir).encode() + b"\0")
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def push(model_dir: str, decision: dict, tracking_uri: str, registered_model_name: str,
         serving_uri: str = "", metrics: dict | None = None, run_name: str | None = None,
         params: dict | None = None, registration: dict | None = None) -> dict:
    """Apply ``decision`` (from :func:`apem.eval.comparison.compare_with_champion`); return what was done and why.

    ``decision`` needs ``blessed`` (bool) and ``reasons`` (list of str), and may carry
    ``champion_version`` (the version the candidate was compared with; None for the first model).
    ``registration``: more keyword arguments of :func:`mlflow_registry.register_model` (``run_id``
    of the training run, ``input_example``, lineage ``version_tags``, ``texts``).
    """
    current = mlflow_registry.champion_version(tracking_uri, registered_model_name)
    result = {
        "pushed": False, "reasons": list(decision.get("reasons", [])), "version": None,
        "previous_champion": current, "registered_model_name": registered_model_name,
        "serving_uri": None, "tracking_uri": tracking_uri,
    }
    if not decision.get("blessed"):
        result["reasons"].insert(0, "not blessed: nothing registered, champion unchanged")
        return result
    digest = model_dir_digest(model_dir)
    registered = mlflow_registry.find_version(tracking_uri, registered_model_name, DIGEST_TAG, digest)
    if registered is not None and registered.version == current:
        return _already_pushed(result, registered, serving_uri, decision)
    compared_with = decision.get("champion_version")
    if "champion_version" in decision and (None if compared_with is None else str(compared_with)) != current:
        result["reasons"].insert(
            0, f"champion moved from {compared_with} to {current} after the evaluation: not pushed, re-evaluate"
        )
        return result
    if registered is None:
        extra = dict(registration or {})
        registered = mlflow_registry.register_model(
            model_dir, tracking_uri, registered_model_name, run_name=run_name, params=params, metrics=metrics,
            tags={"apem.blessed": "true", "apem.previous_champion": str(current)},
            version_tags={**extra.pop("version_tags", {}), DIGEST_TAG: digest, "apem.previous_champion": str(current)},
            **extra,
        )
    result["serving_uri"] = _publish(model_dir, registered, tracking_uri, serving_uri)
    result.update(pushed=True, version=registered.version, model_uri=registered.model_uri,
                  run_id=registered.run_id)
    result["reasons"].insert(0, f"blessed: registered version {registered.version} and made it the champion")
    return result


def _already_pushed(result: dict, registered, serving_uri: str, decision: dict) -> dict:
    """A re-executed push of the candidate that is already the champion: report it, change nothing."""
    result.update(pushed=True, version=registered.version, model_uri=registered.model_uri,
                  run_id=registered.run_id, previous_champion=decision.get("champion_version"),
                  serving_uri=storage.join(serving_uri, f"v{registered.version}") if serving_uri else None)
    result["reasons"].insert(0, f"already pushed: version {registered.version} is this candidate and the "
                                "champion (push re-executed); nothing changed")
    return result


def _publish(model_dir: str, registered, tracking_uri: str, serving_uri: str) -> str | None:
    """Serving copy, then the alias, then the pointer file: the alias never names missing files."""
    version_uri = storage.join(serving_uri, f"v{registered.version}") if serving_uri else None
    if version_uri:
        storage.copy_tree(model_dir, version_uri)
    mlflow_registry.set_champion(tracking_uri, registered.name, registered.version)
    if serving_uri:
        pointer = {
            "registered_model_name": registered.name, "version": registered.version,
            "model_dir": version_uri, "model_uri": registered.model_uri,
            "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_bytes(storage.join(serving_uri, SERVING_POINTER), json.dumps(pointer, indent=2).encode())
    return version_uri


def render_report(result: dict) -> str:
    """The push outcome as Markdown for the Kubeflow UI."""
    lines = [f"# Push: {'promoted' if result['pushed'] else 'not promoted'}", ""]
    if result["pushed"]:
        lines += [
            f"- registered model: `{result['registered_model_name']}` version **{result['version']}** "
            f"(alias `{mlflow_registry.CHAMPION_ALIAS}`)",
            f"- previous champion: {result['previous_champion'] or 'none'}",
            f"- serving copy: `{result['serving_uri'] or 'not requested'}`",
        ]
    else:
        lines.append(f"- champion unchanged: {result['previous_champion'] or 'none'}")
    lines += ["", "## Reasons", ""] + [f"- {r}" for r in result["reasons"]]
    return "\n".join(lines) + "\n"
