"""The one pipeline definition: ``daily_retrain`` = ingest -> validate -> split -> train -> evaluate -> push.

The same definition runs on a Kubeflow cluster (compiled IR YAML, GPU node for train, MLflow
server, gs:// everywhere) and locally with ``kfp.local`` (``apem_kfp.pipelines.local_runner``): local runs
ignore the Kubernetes settings, and train falls back to the CPU. There is no ``dsl.Condition``:
kfp's local runner cannot run one, so the blessing gate lives inside the push component.
Caching is off: every task reads or changes state outside its inputs (fresh logs, the registry).
"""

from kfp import compiler, dsl, kubernetes

from apem_kfp.components.evaluate import evaluate
from apem_kfp.components.ingest import ingest
from apem_kfp.components.push import push
from apem_kfp.components.split import split
from apem_kfp.components.train import train
from apem_kfp.components.validate import validate

PIPELINE_NAME = "apem-daily-retrain"
TASK_ORDER = ("ingest", "validate", "split", "train", "evaluate", "push")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("cloud.google.com/gke-accelerator", "nvidia-l4")
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
GPU_POD_LABEL = ("apem.io/gpu", "true")  # selects infra/'s PodDefault on Kubeflow


def request_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One NVIDIA GPU, on a GPU node (node selector) whose taint the task tolerates; the pod label
    lets infra/'s PodDefault add the same placement where the cluster prefers it that way."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_memory_request("16G")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.add_pod_label(task, label_key=GPU_POD_LABEL[0], label_value=GPU_POD_LABEL[1])
    return task


@dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
def daily_retrain(
    run_date: str = "",
    window_days: int = 14,
    raw_uri: str = "gs://apem-data/raw",
    output_root: str = "gs://apem-data/daily-retrain",
    attribution_window_days: int = 3,
    warn_only_validation: bool = False,
    negative_rate: float = 0.1,
    split_ratios: str = "8,1,1",
    beam_runner: str = "DirectRunner",
    beam_args: str = "",
    model_name: str = "apem",
    model_params: str = "{}",
    epochs: int = 10,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    mlflow_tracking_uri: str = "http://mlflow.apem.svc.cluster.local:5000",
    registered_model_name: str = "apem",
    serving_uri: str = "gs://apem-serving/apem",
    alpha: float = 0.05,
    two_sided: bool = False,
    primary_task: str = "",
    primary_tolerance: float = 0.0,
    chance_margin: float = 0.0,
    bootstrap_resamples: int = 200,
):
    """Retrain on the ``window_days`` days ending ``run_date`` (empty: the day before the scheduled
    time) and promote the candidate only if the blessing rule (alpha, two_sided, primary_task,
    primary_tolerance, chance_margin; see ``apem.eval.blessing``) says it is no worse than the champion."""
    ingest_task = ingest(
        raw_uri=raw_uri, run_date=run_date, window_days=window_days,
        schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER,
        attribution_window_days=attribution_window_days,
    ).set_display_name("ingest")
    validate_task = validate(
        dataset=ingest_task.outputs["dataset"], output_root=output_root, warn_only=warn_only_validation,
    ).set_display_name("validate")
    split_task = split(
        dataset=ingest_task.outputs["dataset"], negative_rate=negative_rate, split_ratios=split_ratios,
        beam_runner=beam_runner, beam_args=beam_args,
    ).set_display_name("split").after(validate_task)
    train_task = train(
        splits=split_task.outputs["splits"], model_name=model_name, model_params=model_params, epochs=epochs,
        batch_size=batch_size, lr=lr, seed=seed, mlflow_tracking_uri=mlflow_tracking_uri,
    ).set_display_name("train")
    request_gpu(train_task)
    evaluate_task = evaluate(
        splits=split_task.outputs["splits"], candidate=train_task.outputs["model"],
        mlflow_tracking_uri=mlflow_tracking_uri, registered_model_name=registered_model_name, alpha=alpha,
        two_sided=two_sided, primary_task=primary_task, primary_tolerance=primary_tolerance,
        chance_margin=chance_margin, bootstrap_resamples=bootstrap_resamples,
    ).set_display_name("evaluate")
    push_task = push(
        candidate=train_task.outputs["model"], evaluation=evaluate_task.outputs["evaluation"],
        mlflow_tracking_uri=mlflow_tracking_uri, registered_model_name=registered_model_name,
        serving_uri=serving_uri, output_root=output_root, report_date=ingest_task.outputs["Output"],
    ).set_display_name("push")
    for task in (ingest_task, validate_task, split_task, train_task, evaluate_task, push_task):
        task.set_caching_options(False)


def compile_pipeline(out: str) -> str:
    """Write the pipeline's IR YAML (for upload in the Kubeflow UI or ``kfp.Client``) to ``out``."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    compiler.Compiler().compile(daily_retrain, package_path=out)
    return out
