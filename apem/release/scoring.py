"""Batch scoring: every row of a dataset through a model named by a directory or by the registry.

The model is a model directory (local or gs://, see ``apem.inference.model_dir``) or a registry
URI, ``models:/apem@champion`` or ``models:/apem/3``: the version's ``model_dir`` artifact is
downloaded from MLflow (``apem.release.mlflow_registry``) into a temporary folder, loaded, and the
folder removed. Either way the same :class:`~apem.inference.model_dir.LoadedModel` scores, so a
registered version predicts exactly what its directory predicts. Predictions are recalibrated for
the training negative rate the model directory records (``meta.negative_rate``), unless told not to.

The output is one Parquet file (tagged as ours, see ``apem.data.ownership``): the spec's id
column, ``p_<label>`` per funnel step and, when the data has labels, ``funnel_violation``.
Used by ``apem predict`` and by the reusable KFP ``score`` component.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterator

from apem.data.atomic import atomic_file
from apem.data.ownership import PREDICTIONS_FILE, PREDICTIONS_TAG, claim_output
from apem.data.storage import is_gcs, local_input
from apem.inference.model_dir import LoadedModel, load_model
from apem.release import mlflow_registry

_LOG = logging.getLogger(__name__)
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri_for(model_ref: str, tracking_uri: str | None) -> str:
    """The tracking URI a registry reference needs: the given one, else ``$MLFLOW_TRACKING_URI``."""
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV, "")
    if not uri:
        raise ValueError(f"{model_ref}: a registry model needs an MLflow tracking URI "
                         f"(--mlflow-uri or {TRACKING_URI_ENV})")
    return uri


@contextlib.contextmanager
def open_model(model_ref: str, tracking_uri: str | None = None) -> Iterator[LoadedModel]:
    """The loaded model ``model_ref`` names (module docstring); ``model_dir`` of the result is the
    reference itself for a registry URI, so messages name what the user typed."""
    if mlflow_registry.is_registry_uri(model_ref):
        uri = tracking_uri_for(model_ref, tracking_uri)
        version = mlflow_registry.resolve_model_uri(uri, model_ref)
        with tempfile.TemporaryDirectory(prefix="apem-registry-") as tmp:
            local = mlflow_registry.download_model_dir(uri, version.name, version.version, tmp)
            loaded = load_model(local)
        loaded.model_dir = model_ref
        loaded.meta = {**loaded.meta, "registered_version": version.to_dict()}
        _LOG.info("loaded %s = %s (run %s)", model_ref, version.model_uri, version.run_id)
        yield loaded
        return
    if not is_gcs(model_ref):
        yield load_model(model_ref)
        return
    with local_input(model_ref) as local:  # a gs:// model directory is downloaded (it needs its _SUCCESS)
        yield load_model(local)


def predictions_table(probs, dataset):
    """id column + ``p_<label>`` per step (+ ``funnel_violation`` for labelled data), tagged as ours."""
    import pyarrow as pa

    columns = {}
    if dataset.spec.id_column:
        columns[dataset.spec.id_column] = dataset.table.column(dataset.spec.id_column)
    for i, name in enumerate(dataset.spec.labels):
        columns[f"p_{name}"] = pa.array(probs[:, i])
    flagged = dataset.funnel_violation
    if flagged is not None:  # labelled data: rows that break the funnel are scored too, and marked
        columns["funnel_violation"] = pa.array(flagged)
        if flagged.any():
            _LOG.warning("%d row(s) violate the funnel order %s; scored and marked in column funnel_violation",
                         int(flagged.sum()), dict(dataset.funnel.by_step))
    return pa.table(columns).replace_schema_metadata(dict([PREDICTIONS_TAG]))


def score_dataset(model_ref: str, data_dir: str, out_path: str, tracking_uri: str | None = None,
                  recalibrate: bool = True, overwrite: bool = False) -> dict:
    """Score every row of ``data_dir`` (labels optional) with ``model_ref`` into the Parquet file
    ``out_path``; return what was scored: rows, model, registered version, negative rate."""
    import pyarrow.parquet as pq

    local_model = () if mlflow_registry.is_registry_uri(model_ref) else (model_ref,)
    claim_output(out_path, PREDICTIONS_FILE, inputs=(*local_model, data_dir), overwrite=overwrite)
    with open_model(model_ref, tracking_uri) as loaded:
        probs, dataset = loaded.predict_dataset(data_dir, recalibrate=recalibrate, scoring=True)
    with atomic_file(os.path.abspath(out_path)) as tmp:
        pq.write_table(predictions_table(probs, dataset), tmp)
    registered = loaded.meta.get("registered_version") or {}
    return {"rows": len(probs), "predictions": out_path, "model": model_ref, "model_name": loaded.name,
            "registered_version": registered.get("version"), "model_uri": registered.get("model_uri"),
            "negative_rate": loaded.negative_rate, "recalibrated": recalibrate,
            "labels": list(dataset.spec.labels)}
