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
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from apem.data import storage
from apem.release import mlflow_registry

SERVING_POINTER = "champion.json"


def push(model_dir: str, decision: dict, tracking_uri: str, registered_model_name: str,
         serving_uri: str = "", metrics: dict | None = None, run_name: str | None = None,
         params: dict | None = None) -> dict:
    """Apply ``decision`` (from :func:`apem.eval.comparison.compare_with_champion`); return what was done and why.

    ``decision`` needs ``blessed`` (bool) and ``reasons`` (list of str), and may carry
    ``champion_version`` (the version the candidate was compared with; None for the first model).
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
    compared_with = decision.get("champion_version")
    if "champion_version" in decision and (None if compared_with is None else str(compared_with)) != current:
        result["reasons"].insert(
            0, f"champion moved from {compared_with} to {current} after the evaluation: not pushed, re-evaluate"
        )
        return result

    registered = mlflow_registry.register_model(
        model_dir, tracking_uri, registered_model_name, run_name=run_name, params=params,
        metrics=metrics, tags={"apem.blessed": "true", "apem.previous_champion": str(current)},
    )
    if serving_uri:
        version_uri = storage.join(serving_uri, f"v{registered.version}")
        storage.copy_tree(model_dir, version_uri)
        result["serving_uri"] = version_uri
    mlflow_registry.set_champion(tracking_uri, registered_model_name, registered.version)
    if serving_uri:
        pointer = {
            "registered_model_name": registered_model_name, "version": registered.version,
            "model_dir": result["serving_uri"], "model_uri": registered.model_uri,
            "pushed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_bytes(storage.join(serving_uri, SERVING_POINTER), json.dumps(pointer, indent=2).encode())
    result.update(pushed=True, version=registered.version, model_uri=registered.model_uri,
                  run_id=registered.run_id)
    result["reasons"].insert(0, f"blessed: registered version {registered.version} and made it the champion")
    return result


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
