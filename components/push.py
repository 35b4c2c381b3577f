"""push: the blessing gate. Registers and promotes a blessed candidate; otherwise changes nothing."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def push(
    candidate: Input[Model],
    evaluation: Input[Artifact],
    splits: Input[Dataset],
    mlflow_tracking_uri: str,
    registered_model_name: str,
    serving_uri: str,
    output_root: str,
    report_date: str,
    kfp_run_id: str,
    report: Output[Markdown],
    metrics: Output[Metrics],
):
    """The gate, visible and enforced. On the cluster this task runs under
    ``dsl.If(evaluate.blessed == True)``, so a rejected candidate shows a skipped push; kfp's local
    runner cannot run conditions (nor ``dsl.Condition``), so there it always runs. Either way it
    re-reads the decision in ``evaluation``:

    - blessed: register a new version of ``registered_model_name`` in MLflow, copy the model to
      ``<serving_uri>/v<version>`` (gs:// or local; skipped when empty), move the alias
      ``champion`` to it and write ``<serving_uri>/champion.json``;
    - not blessed: record why in ``report`` and change nothing.

    The version is logged into the candidate's MLflow training run (its params and metrics sit
    beside it), with a signature, an input example (rows of ``splits/test``), the evaluation report
    as run artifacts and the lineage tags of ``apem.release.lineage`` (git SHA, ``kfp_run_id``,
    data window, ``split.json``, verdict).

    Idempotent, hence retried: a re-executed push of the same candidate registers nothing new and
    moves no alias (``apem.release.push``). The evaluation report, the push report and its outcome
    (``push.json``: ``pushed``, ``version``, ``reasons``) are also kept per run under
    ``<output_root>/reports/<report_date>/<kfp_run_id>/``, and ``reports/latest.json`` points at
    that folder (``apem.release.reports``), so two runs of one day never overwrite each other.
    """
    import json

    from apem.eval.comparison import summary_metrics
    from apem.release.lineage import registration_for
    from apem.release.push import push as run_push
    from apem.release.push import render_report
    from apem.release.reports import write_run_reports

    with open(evaluation.path) as fh:
        result = json.load(fh)
    decision = dict(result["decision"])
    registration = registration_for(splits.path, result, kfp_run_id, candidate.metadata.get("mlflow_run_id"))
    outcome = run_push(candidate.path, decision, mlflow_tracking_uri, registered_model_name, serving_uri,
                       metrics=summary_metrics(result), params={"candidate_uri": candidate.uri},
                       registration=registration)
    text = render_report(outcome)
    with open(report.path, "w") as fh:
        fh.write(text)
    metrics.log_metric("pushed", float(outcome["pushed"]))
    if outcome["version"]:
        metrics.log_metric("version", float(outcome["version"]))
    if output_root:
        write_run_reports(output_root, report_date, kfp_run_id, {
            "evaluation.json": json.dumps(result, default=float).encode(), "push.md": text.encode(),
            "push.json": json.dumps(outcome, indent=2, default=str).encode()})
    print(text)
