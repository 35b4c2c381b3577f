"""The one pipeline definition: ``daily_retrain`` = ingest -> validate -> split -> train -> evaluate -> push.

One factory, :func:`build_daily_retrain`, builds both flavours from the same tasks; one
compile-time flag, ``on_cluster``, chooses:

- ``on_cluster=True`` (:data:`daily_retrain`, what ``apem pipeline compile``/``schedule`` use):
  the tasks run inside ``dsl.ExitHandler(notify)``, so every run ends with a status report and an
  optional webhook post; push runs under ``dsl.If(evaluate.blessed == True)``, so a rejected
  candidate shows as a *skipped* push next to the evaluation's reasons.
- ``on_cluster=False`` (:data:`daily_retrain_local`, what ``apem pipeline run-local`` uses): kfp
  2.13's local runner rejects ``dsl.If`` and ``dsl.ExitHandler``, so push always runs and the gate
  stays inside it (the push component re-reads the decision on the cluster too, so both flavours
  decide the same way); the local runner calls notify's code itself when a task fails.

Both flavours carry the retry policy, requests/limits and timeouts of ``configs.py`` (the one
source of defaults; the local runner ignores the Kubernetes settings and trains on the CPU).
Caching is off: every task reads or changes state outside its inputs (fresh logs, the registry).
"""

from kfp import compiler, dsl, kubernetes

from apem_kfp.components.evaluate import evaluate
from apem_kfp.components.ingest import ingest
from apem_kfp.components.notify import notify
from apem_kfp.components.push import push
from apem_kfp.components.split import split
from apem_kfp.components.train import train
from apem_kfp.components.validate import validate
from apem_kfp.pipelines.configs import DEFAULTS as D
from apem_kfp.pipelines.configs import (MLFLOW_AUTH_ENV, MLFLOW_AUTH_SECRET, MLFLOW_CLIENT_LABEL, MLFLOW_TASKS,
                                        RETRIED_TASKS, RETRY, TASK_RESOURCES)

PIPELINE_NAME = "apem-daily-retrain"
TASK_ORDER = ("ingest", "validate", "split", "train", "evaluate", "push")
GATE_CONDITION_NAME = "blessed"
EXIT_HANDLER_NAME = "daily-retrain"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("cloud.google.com/gke-accelerator", "nvidia-l4")
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
GPU_POD_LABEL = ("apem.io/gpu", "true")  # selects infra/'s PodDefault on Kubeflow


def request_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One NVIDIA GPU, on a GPU node (node selector) whose taint the task tolerates; the pod label
    lets infra/'s PodDefault add the same placement where the cluster prefers it that way."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    kubernetes.add_pod_label(task, label_key=GPU_POD_LABEL[0], label_value=GPU_POD_LABEL[1])
    return task


def configure(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Display name, requests/limits, timeout, (for idempotent tasks) retries and (for MLflow clients)
    the NetworkPolicy label and basic-auth credentials, from configs.py."""
    resources = TASK_RESOURCES[name]
    task.set_display_name(name).set_caching_options(False)
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    kubernetes.set_timeout(task, resources.timeout_seconds)
    if name in RETRIED_TASKS:
        task.set_retry(num_retries=RETRY.num_retries, backoff_duration=RETRY.backoff_duration,
                       backoff_factor=RETRY.backoff_factor, backoff_max_duration=RETRY.backoff_max_duration)
    if name in MLFLOW_TASKS:  # admitted by infra/'s NetworkPolicy, authenticated by MLflow basic auth
        kubernetes.add_pod_label(task, label_key=MLFLOW_CLIENT_LABEL[0], label_value=MLFLOW_CLIENT_LABEL[1])
        kubernetes.use_secret_as_env(task, secret_name=MLFLOW_AUTH_SECRET, secret_key_to_env=MLFLOW_AUTH_ENV)
    return task


def retrain_tasks(p: dict) -> dict[str, dsl.PipelineTask]:
    """ingest -> validate -> split -> train -> evaluate, with ``p`` the pipeline's parameters."""
    t = {"ingest": ingest(
        raw_uri=p["raw_uri"], run_date=p["run_date"], window_days=p["window_days"],
        schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER,
        attribution_window_days=p["attribution_window_days"], engine=p["data_engine"],
        beam_runner=p["beam_runner"], beam_args=p["beam_args"])}
    t["validate"] = validate(dataset=t["ingest"].outputs["dataset"], output_root=p["output_root"],
                             warn_only=p["warn_only_validation"], engine=p["data_engine"],
                             beam_runner=p["beam_runner"], beam_args=p["beam_args"])
    t["split"] = split(
        dataset=t["ingest"].outputs["dataset"], negative_rate=p["negative_rate"], split_ratios=p["split_ratios"],
        beam_runner=p["beam_runner"], beam_args=p["beam_args"]).after(t["validate"])
    t["train"] = request_gpu(train(
        splits=t["split"].outputs["splits"], model_name=p["model_name"], model_params=p["model_params"],
        epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], seed=p["seed"],
        mlflow_tracking_uri=p["mlflow_tracking_uri"]))
    t["evaluate"] = evaluate(
        splits=t["split"].outputs["splits"], candidate=t["train"].outputs["model"],
        mlflow_tracking_uri=p["mlflow_tracking_uri"], registered_model_name=p["registered_model_name"],
        alpha=p["alpha"], two_sided=p["two_sided"], primary_task=p["primary_task"],
        primary_tolerance=p["primary_tolerance"], chance_margin=p["chance_margin"],
        bootstrap_resamples=p["bootstrap_resamples"])
    return {name: configure(task, name) for name, task in t.items()}


def push_task(p: dict, t: dict[str, dsl.PipelineTask]) -> dsl.PipelineTask:
    return configure(push(
        candidate=t["train"].outputs["model"], evaluation=t["evaluate"].outputs["evaluation"],
        splits=t["split"].outputs["splits"], kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, mlflow_tracking_uri=p["mlflow_tracking_uri"], registered_model_name=p["registered_model_name"],
        serving_uri=p["serving_uri"], output_root=p["output_root"], report_date=t["ingest"].outputs["Output"],
    ), "push")


def build_tasks(p: dict, on_cluster: bool) -> None:
    """The body of both flavours (see the module docstring)."""
    if not on_cluster:
        push_task(p, retrain_tasks(p))
        return
    exit_task = configure(notify(
        run_date=p["run_date"], window_days=p["window_days"],
        schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER, webhook_url=p["webhook_url"]), "notify")
    with dsl.ExitHandler(exit_task, name=EXIT_HANDLER_NAME):
        tasks = retrain_tasks(p)
        with dsl.If(tasks["evaluate"].outputs["blessed"] == True, name=GATE_CONDITION_NAME):  # noqa: E712
            push_task(p, tasks)


def build_daily_retrain(on_cluster: bool = True):
    """The ``daily_retrain`` pipeline; ``on_cluster`` chooses the flavour (see the module docstring)."""

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def daily_retrain(
        run_date: str = D.run_date, window_days: int = D.window_days, raw_uri: str = D.raw_uri,
        output_root: str = D.output_root, attribution_window_days: int = D.attribution_window_days,
        warn_only_validation: bool = D.warn_only_validation, negative_rate: float = D.negative_rate,
        split_ratios: str = D.split_ratios, data_engine: str = D.data_engine, beam_runner: str = D.beam_runner,
        beam_args: str = D.beam_args,
        model_name: str = D.model_name, model_params: str = D.model_params, epochs: int = D.epochs,
        batch_size: int = D.batch_size, lr: float = D.lr, seed: int = D.seed,
        mlflow_tracking_uri: str = D.mlflow_tracking_uri, registered_model_name: str = D.registered_model_name,
        serving_uri: str = D.serving_uri, alpha: float = D.alpha, two_sided: bool = D.two_sided,
        primary_task: str = D.primary_task, primary_tolerance: float = D.primary_tolerance,
        chance_margin: float = D.chance_margin, bootstrap_resamples: int = D.bootstrap_resamples,
        webhook_url: str = D.webhook_url,
    ):
        """Retrain on the ``window_days`` days ending ``run_date`` (empty: the day before the scheduled
        time) and promote the candidate only if the blessing rule (alpha, two_sided, primary_task,
        primary_tolerance, chance_margin; see ``apem.eval.blessing``) says it is no worse than the
        champion. ``webhook_url``: where the exit handler posts the run's status (empty: nowhere)."""
        build_tasks(dict(locals()), on_cluster)

    return daily_retrain


daily_retrain = build_daily_retrain(on_cluster=True)
daily_retrain_local = build_daily_retrain(on_cluster=False)


def compile_pipeline(out: str, on_cluster: bool = True) -> str:
    """Write the pipeline's IR YAML (for upload in the Kubeflow UI or ``kfp.Client``) to ``out``."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    compiler.Compiler().compile(daily_retrain if on_cluster else daily_retrain_local, package_path=out)
    return out
