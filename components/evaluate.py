"""evaluate: candidate vs champion on the same test split, DeLong + bootstrap, blessing decision."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from apem_kfp.components import APEM_IMAGE

ROC_TASKS = ("click", "authorize", "convert")  # one roc_<label> output each; see evaluate's docstring


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def evaluate(
    splits: Input[Dataset],
    candidate: Input[Model],
    mlflow_tracking_uri: str,
    registered_model_name: str,
    alpha: float,
    two_sided: bool,
    primary_task: str,
    primary_tolerance: float,
    chance_margin: float,
    bootstrap_resamples: int,
    evaluation: Output[Artifact],
    report: Output[Markdown],
    metrics: Output[Metrics],
    roc_click: Output[ClassificationMetrics],
    roc_authorize: Output[ClassificationMetrics],
    roc_convert: Output[ClassificationMetrics],
) -> NamedTuple("EvaluateOutputs", [("blessed", bool)]):
    """Score ``splits/test`` with the candidate and with the champion (MLflow registry alias
    ``champion`` of ``registered_model_name``), run DeLong's paired test and the paired bootstrap per
    task, and apply the blessing rule (``apem.eval.blessing``: no task significantly worse at ``alpha``,
    primary task not worse by point estimate; without a champion, beat chance on every task).
    ``evaluation`` holds the JSON the push component acts on; ``report`` the decision and reasons,
    the calibration table per step after recalibration and the funnel consistency rate;
    ``roc_<label>`` the candidate's ROC curve of each step of ``ROC_TASKS`` (the funnel of
    ``apem.data.features``; KFP outputs are fixed at compile time, so another funnel adds its own
    outputs here, and any step without one keeps its curve in ``evaluation``). Returns ``blessed``, which the cluster
    pipeline's ``dsl.If`` reads to run or skip push.
    """
    import json
    import os

    from apem.eval.blessing import BlessingRule
    from apem.eval.comparison import render_report, summary_metrics
    from apem.release.champion import evaluate_against_registry

    rule = BlessingRule(alpha=alpha, two_sided=two_sided, primary_task=primary_task,
                        primary_tolerance=primary_tolerance, chance_margin=chance_margin)
    result = evaluate_against_registry(candidate.path, os.path.join(splits.path, "test"), mlflow_tracking_uri,
                                       registered_model_name, rule=rule, bootstrap_resamples=bootstrap_resamples)
    with open(evaluation.path, "w") as fh:
        json.dump(result, fh, indent=2, default=float)
    with open(report.path, "w") as fh:
        fh.write(render_report(result))
    evaluation.metadata.update({"blessed": result["decision"]["blessed"],
                                "champion_version": result["champion_version"]})
    for key, value in summary_metrics(result).items():
        metrics.log_metric(key, value)
    for label, output in {"click": roc_click, "authorize": roc_authorize, "convert": roc_convert}.items():
        curve = result["roc"].get(label, {"fpr": []})
        output.metadata["task"] = label
        if curve["fpr"]:
            output.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
    print("\n".join(result["decision"]["reasons"]))
    from collections import namedtuple

    return namedtuple("EvaluateOutputs", ["blessed"])(bool(result["decision"]["blessed"]))
