"""The one source of ``daily_retrain`` defaults (TFX-template style ``configs.py``).

- :data:`DEFAULTS`: every pipeline parameter's default; ``daily_retrain``'s signature reads them here.
- :data:`ENVIRONMENTS`: what a cluster environment (``dev``, ``prod``) changes, applied by
  ``apem pipeline schedule --env NAME``. It replaces the former ConfigMap ``apem-pipeline-defaults``,
  which no code read; ``infra/`` keeps only what the MLflow server itself reads.
- :data:`TASK_RESOURCES`: requests, limits and a timeout for every task; :data:`RETRY` and
  :data:`RETRIED_TASKS`: which tasks are retried, and with which backoff.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from apem_kfp.components import APEM_IMAGE


@dataclass(frozen=True)
class PipelineDefaults:
    run_date: str = ""  # empty: the day before the scheduled time
    window_days: int = 14
    raw_uri: str = "gs://apem-data/raw"
    output_root: str = "gs://apem-data/daily-retrain"
    attribution_window_days: int = 3
    warn_only_validation: bool = False
    negative_rate: float = 0.1
    split_ratios: str = "8,1,1"
    data_engine: str = "local"  # ingest and validation statistics: "local" (one process) or "beam"
    beam_runner: str = "DirectRunner"
    beam_args: str = ""
    model_name: str = "apem"
    model_params: str = "{}"
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    mlflow_tracking_uri: str = "http://mlflow.apem.svc.cluster.local:5000"
    registered_model_name: str = "apem"
    serving_uri: str = "gs://apem-serving/apem"
    alpha: float = 0.05
    two_sided: bool = False
    primary_task: str = ""
    primary_tolerance: float = 0.0
    chance_margin: float = 0.0
    bootstrap_resamples: int = 200
    webhook_url: str = ""  # Slack/Teams-style incoming webhook for the run's status; empty: no post

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = PipelineDefaults()

# Dataflow workers run the component image, so they have apem without any --setup_file.
PROD_DATAFLOW_ARGS = " ".join((
    "--project=apem-prod", "--region=europe-west4", "--temp_location=gs://apem-prod-data/beam-tmp",
    "--staging_location=gs://apem-prod-data/beam-staging",
    "--service_account_email=apem-dataflow@apem-prod.iam.gserviceaccount.com",
    f"--sdk_container_image={APEM_IMAGE}", "--experiments=use_runner_v2",
))

ENVIRONMENTS: dict[str, dict] = {
    "dev": {
        "raw_uri": "gs://apem-dev-data/raw", "output_root": "gs://apem-dev-data/daily-retrain",
        "serving_uri": "gs://apem-dev-serving/apem", "window_days": 7, "epochs": 3,
    },
    "prod": {
        "raw_uri": "gs://apem-prod-data/raw", "output_root": "gs://apem-prod-data/daily-retrain",
        "serving_uri": "gs://apem-prod-serving/apem", "beam_runner": "DataflowRunner",
        "beam_args": PROD_DATAFLOW_ARGS, "data_engine": "beam",
        # a window of 2M+ training rows streams (data_loading "auto"); 3 DataLoader processes read and
        # encode it beside the trainer, within the train task's 4 requested CPUs (TASK_RESOURCES)
        "model_params": json.dumps({"data_loading": "auto", "loader_workers": 3}),
    },
}


def environment_parameters(name: str) -> dict:
    """The parameters a cluster environment sets on top of :data:`DEFAULTS` (unknown name: ValueError)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(ENVIRONMENTS))}")
    return dict(ENVIRONMENTS[name])


@dataclass(frozen=True)
class TaskResources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_seconds: int  # the pod's activeDeadlineSeconds: a hung task fails instead of blocking the night


TASK_RESOURCES: dict[str, TaskResources] = {
    "ingest": TaskResources("2", "4", "8G", "16G", 2 * 3600),
    "validate": TaskResources("2", "4", "8G", "16G", 3600),
    "split": TaskResources("1", "2", "4G", "8G", 3 * 3600),  # heavy lifting happens on Dataflow in prod
    "train": TaskResources("4", "8", "16G", "32G", 6 * 3600),
    "evaluate": TaskResources("2", "4", "8G", "16G", 3600),
    "push": TaskResources("1", "2", "2G", "4G", 1800),
    "notify": TaskResources("100m", "500m", "256M", "512M", 300),
}


@dataclass(frozen=True)
class RetryPolicy:
    num_retries: int = 3
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "3600s"


RETRY = RetryPolicy()
# Idempotent for the same run date: they rewrite only their own outputs. Push is idempotent too
# (apem.release.push recognises a candidate it already registered), so a transient registry or
# storage error retries it as well. Evaluate reads only; notify must not post twice.
RETRIED_TASKS = ("ingest", "validate", "split", "train", "evaluate", "push")

# The tasks that talk to the MLflow server. On the cluster they carry the pod label that infra/'s
# NetworkPolicy ``mlflow`` admits, and MLflow basic-auth credentials from the Secret
# MLFLOW_AUTH_SECRET (keys ``username``, ``password``; created out of band, see infra/README.md)
# as the environment variables the MLflow client reads.
MLFLOW_TASKS = ("train", "evaluate", "push")
MLFLOW_CLIENT_LABEL = ("apem.io/mlflow-client", "true")
MLFLOW_AUTH_SECRET = "mlflow-pipeline-auth"
MLFLOW_AUTH_ENV = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
