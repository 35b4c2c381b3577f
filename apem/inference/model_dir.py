"""Safe model directories: weights as a state_dict, everything else as JSON. No pickled modules.

```
MODEL_DIR/
  weights.pt      torch.save(state_dict); loaded with torch.load(weights_only=True)
  config.json     format version, registry model name, typed model config, loss config, fields, labels
  features.json   the fitted FeatureEncoder state
```
A directory is written into a temporary sibling and renamed into place, so readers never see a
half-written model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from apem.data.atomic import staged_dir
from apem.data.encoding import FeatureEncoder, FieldSpec
from apem.data.ownership import MODEL_DIR, claim_output
from apem.data.split_record import check_negative_rate
from apem.data.spec import Dataset, DatasetError, DatasetSpec, check_same_spec, read_dataset
from apem.inference.calibration import recalibrate as recalibrate_probs
from apem.inference.predict import predict
from apem.models import build_model
from apem.models.base import MultiTaskModel

# 2: models share one skeleton (batched task towers, composed attention modules); version 1 weights
# have other parameter names.
FORMAT_VERSION = 2
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
FEATURES_FILE = "features.json"


class ModelDirError(ValueError):
    """A model directory that cannot be loaded: the message names the directory and the reason."""


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("apem")
    except Exception:  # not installed as a distribution (e.g. running from a checkout)
        return "unknown"


def save_model(out_dir: str, model: MultiTaskModel, encoder: FeatureEncoder, spec: DatasetSpec,
               extra_meta: dict | None = None, overwrite: bool = False) -> str:
    """Write ``model`` (state_dict + JSON config) and the feature state to ``out_dir`` atomically;
    only an earlier model directory (or anything, with ``overwrite``) is replaced."""
    out_dir = os.path.abspath(out_dir)
    claim_output(out_dir, MODEL_DIR, overwrite=overwrite)
    config = {
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "model": model.registry_name,
        "config": asdict(model.config),
        "loss": asdict(model.loss_config),
        "fields": [asdict(f) for f in model.fields],
        "n_tasks": model.n_tasks,
        "labels": list(spec.labels),
        "spec": spec.to_dict(),
        "meta": extra_meta or {},
    }
    with staged_dir(out_dir) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            json.dump(config, fh, indent=2, default=float)
        with open(os.path.join(tmp, FEATURES_FILE), "w") as fh:
            json.dump(encoder.to_dict(), fh)
    return out_dir


@dataclass
class LoadedModel:
    model: MultiTaskModel
    encoder: FeatureEncoder
    spec: DatasetSpec
    meta: dict
    model_dir: str = ""
    name: str = ""  # registry name, e.g. "apem_wo_ld"

    @property
    def negative_rate(self) -> float:
        return float(self.meta.get("negative_rate", 1.0))

    def warm_up(self) -> None:
        """Predict one encoded row (every index and value 0) and drop it, so that what a model does once per
        process is done at load rather than in the first request: building APEM's CPU kernels on first use
        (about a second, :mod:`apem.nn.native`), torch's lazy initialisation."""
        predict(self.model, torch.zeros(1, self.encoder.input_width, dtype=torch.long))

    def predict_table(self, table: pa.Table, recalibrate: bool = True, batch_size: int = 2048) -> np.ndarray:
        """(rows, N) entire-space probabilities for a table holding the model's feature columns.

        With ``recalibrate`` the predictions are corrected for the training negative rate
        (:func:`apem.inference.calibration.recalibrate`; a no-op for rate 1).
        """
        missing = [c for c in self.spec.features if c not in table.column_names]
        if missing:
            raise DatasetError(f"data lacks feature column(s) {missing} that model {self.model_dir} needs")
        probs = predict(self.model, torch.from_numpy(self.encoder.transform(table)), batch_size=batch_size)
        return recalibrate_probs(probs, self.negative_rate) if recalibrate else probs.astype(np.float64)

    def predict_frame(self, frame):
        """A pandas DataFrame of feature rows -> a DataFrame with one column ``p_<label>`` per step
        (recalibrated): what the registered MLflow model serves."""
        import pandas as pd

        probs = self.predict_table(pa.Table.from_pandas(pd.DataFrame(frame), preserve_index=False))
        return pd.DataFrame(probs, columns=[f"p_{label}" for label in self.spec.labels])

    def check_spec(self, spec: DatasetSpec, source: str) -> None:
        check_same_spec(self.spec, spec, f"{source} vs model {self.model_dir}")

    def predict_dataset(self, data_dir: str, recalibrate: bool = True, scoring: bool = False
                        ) -> tuple[np.ndarray, Dataset]:
        """Read a dataset directory (checked against the model's spec) and predict every row.
        ``scoring``: labels are optional and every row is scored, rows that break the funnel order
        flagged in ``Dataset.funnel_violation`` instead of dropped (what ``apem predict`` writes)."""
        dataset = read_dataset(data_dir, funnel_policy="flag" if scoring else None, require_labels=not scoring)
        self.check_spec(dataset.spec, data_dir)
        return self.predict_table(dataset.table, recalibrate=recalibrate), dataset


def feature_frame(table: pa.Table, features, rows: int | None = None):
    """The feature columns of ``table`` as the plain pandas frame a client sends (strings, not the
    dictionary-encoded categories Parquet gives back), the form a served model's signature expects."""
    frame = table.select(list(features)).slice(0, rows).to_pandas()
    for column in frame.select_dtypes("category").columns:
        frame[column] = frame[column].astype(str)
    return frame


def _read_json(model_dir: str, name: str) -> dict:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        raise ModelDirError(f"{model_dir}: not a model directory ({name} is missing)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise ModelDirError(f"{path}: unreadable ({err})") from None


def _load_failure(err: Exception) -> str:
    """Why torch could not load the weights, without torch's advice to unpickle untrusted code."""
    text = str(err)
    if "Weights only load failed" in text:
        unsupported = [line.strip() for line in text.splitlines() if "Unsupported" in line]
        return "refused: the file holds pickled objects, not only tensors" + (
            f"; {unsupported[0]}" if unsupported else "")
    return (text.strip().splitlines() or [type(err).__name__])[0]


def load_model(model_dir: str) -> LoadedModel:
    """Rebuild a saved model from its JSON config and load its weights with ``weights_only=True``."""
    if not os.path.isdir(model_dir):
        raise ModelDirError(f"{model_dir}: model directory not found")
    config = _read_json(model_dir, CONFIG_FILE)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirError(
            f"{model_dir}: model format version {version!r} is not supported by this build (reads {FORMAT_VERSION}); "
            "retrain or load it with the apem version that wrote it"
        )
    try:
        encoder = FeatureEncoder.from_dict(_read_json(model_dir, FEATURES_FILE))
        spec = DatasetSpec.from_dict(config["spec"], source=f"{model_dir}/{CONFIG_FILE}")
        fields = [FieldSpec(**f) for f in config["fields"]]
        model = build_model(config["model"], fields, int(config["n_tasks"]), config["config"], config["loss"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelDirError(f"{model_dir}: invalid model config ({err})") from None
    if fields != encoder.fields:
        raise ModelDirError(f"{model_dir}: {FEATURES_FILE} does not match the fields in {CONFIG_FILE}")
    weights = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise ModelDirError(f"{model_dir}: not a model directory ({WEIGHTS_FILE} is missing)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # torch raises several types for corrupt or mismatched weights
        raise ModelDirError(f"{weights}: cannot load weights ({_load_failure(err)})") from None
    model.eval()
    meta = config.get("meta") if isinstance(config.get("meta"), dict) else {}
    check_negative_rate(meta.get("negative_rate", 1.0), lambda msg: ModelDirError(f"{model_dir}/{CONFIG_FILE}: meta.{msg}"))
    return LoadedModel(model=model, encoder=encoder, spec=spec, meta=meta, model_dir=model_dir, name=config["model"])
