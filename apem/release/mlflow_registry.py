"""The MLflow model registry: register a model directory, move the ``champion`` alias, fetch it back.

A registered version is an MLflow "model from code": the code is ``apem/inference/serving.py`` (no
pickled Python object) and the model directory (state_dict + JSON config + feature state, see
``apem.inference.model_dir``) rides along as the artifact ``model_dir``. The ``apem`` package itself
ships in the model (``code_paths``), so ``mlflow.pyfunc.load_model("models:/apem@champion")`` works
where only mlflow and torch are installed. Each version is logged with a signature and an input
example, into the training run when its id is known (its params and metrics then sit beside the model). The champion is the version the
registry alias ``champion`` points at (aliases, not the deprecated stages).

Locally the tracking URI is ``sqlite:///<dir>/mlflow.db`` and artifacts go to ``<dir>/artifacts``;
on the cluster it is the MLflow server of ``infra/``, whose artifact root is on gs://.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from importlib import metadata, resources

CHAMPION_ALIAS = "champion"
DEFAULT_EXPERIMENT = "apem-daily-retrain"
MODEL_DIR_ARTIFACT = "model_dir"
SERVING_CODE = str(resources.files("apem.inference") / "serving.py")  # not imported here: it calls set_model
APEM_SOURCE = str(resources.files("apem"))  # shipped whole as the model's code_paths
# what the serving code imports; pinned to the versions running here so the registry's
# requirements.txt matches the image (listing them avoids MLflow's slow requirement inference)
SERVING_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "pyyaml")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChampionModel:
    name: str
    version: str
    model_dir: str  # local directory loadable with apem.inference.model_dir.load_model

    def to_dict(self) -> dict:
        return asdict(self)


def sqlite_tracking_uri(directory: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(directory, 'mlflow.db'))}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """``<dir>/artifacts`` beside a sqlite store; None for a server, which owns its artifact root."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri[len("sqlite:///"):]
    return "file://" + os.path.join(os.path.dirname(os.path.abspath(db_path)), "artifacts")


def _check_tracking_uri(tracking_uri: str) -> None:
    if not tracking_uri:
        raise ValueError("an MLflow tracking URI is required (e.g. sqlite:///runs/local/mlflow/mlflow.db)")
    if tracking_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///"):])), exist_ok=True)


@contextlib.contextmanager
def tracking(tracking_uri: str):
    """MLflow's fluent API keeps the tracking URI globally (and in the environment, for
    subprocesses); set it for this block only, then put back what was there, or nothing."""
    import mlflow

    _check_tracking_uri(tracking_uri)
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        # the registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise
        yield mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    finally:
        mlflow.set_tracking_uri(previous)


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (with a local artifact root beside a sqlite store) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=local_artifact_root(tracking_uri))


def _pip_requirements() -> list[str]:
    reqs = []
    for package in SERVING_PACKAGES:
        try:
            reqs.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(package)
    return reqs


def register_model(model_dir: str, tracking_uri: str, registered_model_name: str,
                   experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                   params: dict | None = None, metrics: dict | None = None,
                   tags: dict | None = None, version_tags: dict | None = None, run_id: str | None = None,
                   input_example=None, texts: dict | None = None) -> RegisteredVersion:
    """Log ``model_dir`` as a models-from-code pyfunc and register it as a new version.

    ``run_id``: log into that (training) run instead of a new run in ``experiment``.
    ``input_example`` (a DataFrame of feature rows) also yields the signature. ``texts``: extra
    artifacts of the run, path -> text (the evaluation report). ``version_tags`` are set when the
    version is created (one call), so a version is never seen without them: push finds an earlier
    registration of the same candidate by its digest tag.
    """
    import mlflow

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    with tracking(tracking_uri) as client:
        where = {"run_id": run_id} if run_id else {
            "experiment_id": ensure_experiment(client, experiment, tracking_uri), "run_name": run_name}
        with mlflow.start_run(**where) as run:
            _log_run_details(params, metrics, tags, texts)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=SERVING_CODE,
                artifacts={MODEL_DIR_ARTIFACT: os.path.abspath(model_dir)},
                code_paths=[APEM_SOURCE],
                pip_requirements=_pip_requirements(),
                input_example=input_example,
                signature=None if input_example is None else serving_signature(model_dir, input_example),
            )
        version = mlflow.register_model(info.model_uri, registered_model_name,
                                        tags={k: str(v) for k, v in (version_tags or {}).items()})
        return RegisteredVersion(
            name=registered_model_name, version=str(version.version),
            run_id=run.info.run_id, model_uri=f"models:/{registered_model_name}/{version.version}",
        )


def _log_run_details(params: dict | None, metrics: dict | None, tags: dict | None, texts: dict | None) -> None:
    import mlflow

    if params:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    if tags:
        mlflow.set_tags(tags)
    for path, text in (texts or {}).items():
        mlflow.log_text(text, path)


def serving_signature(model_dir: str, input_example):
    """The pyfunc's signature: the example's feature columns in, one ``p_<label>`` per step out."""
    from mlflow.models import infer_signature

    from apem.inference.model_dir import load_model

    return infer_signature(input_example, load_model(model_dir).predict_frame(input_example))


def find_version(tracking_uri: str, registered_model_name: str, tag: str, value: str) -> RegisteredVersion | None:
    """The first version of ``registered_model_name`` tagged ``tag=value``; None when there is none."""
    with tracking(tracking_uri) as client:
        versions = client.search_model_versions(f"name='{registered_model_name}'")
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.tags.get(tag) == value:
            return RegisteredVersion(name=registered_model_name, version=str(version.version),
                                     run_id=version.run_id,
                                     model_uri=f"models:/{registered_model_name}/{version.version}")
    return None


def set_champion(tracking_uri: str, registered_model_name: str, version: str) -> None:
    with tracking(tracking_uri) as client:
        client.set_registered_model_alias(registered_model_name, CHAMPION_ALIAS, str(version))


def champion_version(tracking_uri: str, registered_model_name: str) -> str | None:
    """The version the ``champion`` alias points at; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    with tracking(tracking_uri) as client:
        try:
            model = client.get_registered_model(registered_model_name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        version = model.aliases.get(CHAMPION_ALIAS)
        return str(version) if version is not None else None


def download_model_dir(tracking_uri: str, registered_model_name: str, version: str, dst_dir: str) -> str:
    """Download a registered version and return the local path of its ``model_dir`` artifact."""
    import mlflow
    import yaml

    with tracking(tracking_uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_model_name}/{version}", dst_path=dst_dir,
        )
    with open(os.path.join(local, "MLmodel")) as fh:
        flavor = yaml.safe_load(fh)["flavors"]["python_function"]
    try:
        relative = flavor["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    except KeyError:
        raise ValueError(
            f"models:/{registered_model_name}/{version} has no '{MODEL_DIR_ARTIFACT}' artifact; "
            "it was not registered by apem.release.mlflow_registry"
        ) from None
    return os.path.join(local, relative)


REGISTRY_SCHEME = "models:/"


def is_registry_uri(ref: str) -> bool:
    return str(ref).startswith(REGISTRY_SCHEME)


def resolve_model_uri(tracking_uri: str, model_uri: str) -> RegisteredVersion:
    """The version a registry URI names: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
    A missing model, alias or version raises ``ValueError`` naming the URI and the store."""
    from mlflow.exceptions import MlflowException

    rest = model_uri[len(REGISTRY_SCHEME):] if is_registry_uri(model_uri) else ""
    name, at, alias = rest.partition("@")
    if not at:
        name, _, alias = rest.rpartition("/")
    if not name or not alias:
        raise ValueError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    with tracking(tracking_uri) as client:
        try:
            found = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
        except MlflowException as err:
            first_line = (str(err.message).strip().splitlines() or [err.error_code])[0]
            raise ValueError(f"{model_uri}: not found in the registry at {tracking_uri} ({first_line})") from None
    return RegisteredVersion(name=name, version=str(found.version), run_id=found.run_id,
                             model_uri=f"{REGISTRY_SCHEME}{name}/{found.version}")


def download_champion(tracking_uri: str, registered_model_name: str, dst_dir: str) -> ChampionModel | None:
    """The champion's model directory downloaded under ``dst_dir``; None when there is no champion."""
    version = champion_version(tracking_uri, registered_model_name)
    if version is None:
        return None
    model_dir = download_model_dir(tracking_uri, registered_model_name, version, dst_dir)
    return ChampionModel(name=registered_model_name, version=version, model_dir=model_dir)
