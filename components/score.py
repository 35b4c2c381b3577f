"""score: batch scoring with a registered model (the champion by default), reusable in any pipeline."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def score(
    data: Input[Dataset],
    mlflow_tracking_uri: str,
    predictions: Output[Dataset],
    metrics: Output[Metrics],
    model_uri: str = "models:/apem@champion",
    recalibrate: bool = True,
):
    """Score every row of ``data`` (a dataset directory: Parquet files + ``spec.yaml``; label
    columns optional) with ``model_uri``: a registry URI (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, resolved in the MLflow registry at ``mlflow_tracking_uri``) or a
    model directory. ``predictions`` is one Parquet file: the spec's id column and ``p_<label>``,
    the entire-space probability of each funnel step, recalibrated for the model's training
    negative rate unless ``recalibrate`` is false (plus ``funnel_violation`` for labelled data).
    Its metadata names the resolved version, so the scores trace back to a model. ``metrics``:
    rows scored and the mean probability per step.

    Reuse it from its compiled YAML: ``kfp.components.load_component_from_file("score.yaml")``
    (``apem_kfp.components`` ships it), e.g. behind a ``dsl.importer`` of a feature table.
    """
    import pyarrow.parquet as pq

    from apem.release.scoring import score_dataset

    summary = score_dataset(model_uri, data.path, predictions.path, tracking_uri=mlflow_tracking_uri or None,
                            recalibrate=recalibrate, overwrite=True)
    predictions.metadata.update({k: v for k, v in summary.items() if k != "predictions" and v is not None})
    metrics.log_metric("rows", float(summary["rows"]))
    table = pq.read_table(predictions.path)
    for label in summary["labels"]:
        metrics.log_metric(f"mean_p_{label}", float(table.column(f"p_{label}").to_numpy().mean()))
    print(f"scored {summary['rows']} rows of {data.uri} with {summary['model_uri'] or model_uri}")
