"""Compile the pipeline through the CLI and check the IR; reuse each committed component YAML."""

import filecmp
import inspect
import os

import pytest
import yaml
from kfp import compiler, dsl
from kfp.components import load_component_from_file

import apem_kfp.components
from apem.cli.main import main
from apem_kfp.components.compile_components import compile_components
from apem_kfp.pipelines import configs
from apem_kfp.pipelines import daily_retrain as dr

COMPONENT_DIR = os.path.dirname(os.path.abspath(apem_kfp.components.__file__))


def read_ir(path):
    with open(path) as fh:
        pipeline_spec, platform_spec = yaml.safe_load_all(fh)
    return pipeline_spec, platform_spec


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The cluster flavour, compiled by the CLI the way a user does before uploading it."""
    out = str(tmp_path_factory.mktemp("ir") / "daily_retrain.yaml")
    assert main(["pipeline", "compile", "--out", out]) == 0
    return read_ir(out)


@pytest.fixture(scope="module")
def compiled_local(tmp_path_factory):
    return read_ir(dr.compile_pipeline(str(tmp_path_factory.mktemp("ir") / "local.yaml"), on_cluster=False))


def tasks_by_name(spec):
    """Every task of the IR, wherever it is nested (exit handler, condition): name -> (its DAG, spec)."""
    found = {name: ("root", task) for name, task in spec["root"]["dag"]["tasks"].items()}
    for component, body in spec["components"].items():
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            found[name] = (component, task)
    return found


def topological_order(tasks):
    order, done = [], set()
    while len(order) < len(tasks):
        ready = sorted(n for n, t in tasks.items() if n not in done and set(t.get("dependentTasks", [])) <= done)
        assert len(ready) == 1, f"tasks {ready} could run in either order"
        order.append(ready[0])
        done.add(ready[0])
    return tuple(order)


def test_local_flavour_six_tasks_in_order_without_conditions(compiled_local):
    spec, _ = compiled_local
    tasks = spec["root"]["dag"]["tasks"]
    assert topological_order(tasks) == dr.TASK_ORDER == ("ingest", "validate", "split", "train", "evaluate", "push")
    assert all("triggerPolicy" not in t for t in tasks.values())  # kfp.local: the gate is inside push
    assert all(t["cachingOptions"] == {} or not t["cachingOptions"].get("enableCache") for t in tasks.values())
    # artifacts flow along the chain
    assert tasks["train"]["inputs"]["artifacts"]["splits"]["taskOutputArtifact"]["producerTask"] == "split"
    evaluation = tasks["push"]["inputs"]["artifacts"]["evaluation"]["taskOutputArtifact"]
    assert evaluation == {"outputArtifactKey": "evaluation", "producerTask": "evaluate"}
    schedule_time = tasks["ingest"]["inputs"]["parameters"]["schedule_time"]["runtimeValue"]["constant"]
    assert schedule_time == dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER


def test_cluster_flavour_wraps_the_run_in_an_exit_handler_that_notifies(compiled):
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "notify"}
    notify = root["notify"]
    assert notify["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}  # runs on failure too
    assert notify["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert notify["inputs"]["parameters"]["webhook_url"] == {"componentInputParameter": "webhook_url"}
    inside = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"ingest", "validate", "split", "train", "evaluate"} <= set(inside)


def test_cluster_flavour_runs_push_under_the_blessed_condition(compiled):
    spec, _ = compiled
    tasks = tasks_by_name(spec)
    push_dag, _ = tasks["push"]
    gate = [task for name, (_, task) in tasks.items() if task["componentRef"]["name"] == push_dag]
    assert len(gate) == 1
    condition = gate[0]["triggerPolicy"]["condition"]
    assert "evaluate-blessed" in condition and condition.endswith("== true")
    assert tasks["evaluate"][1]["taskInfo"]["name"] == "evaluate"
    assert "blessed" in spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]


@pytest.mark.parametrize("flavour", ["compiled", "compiled_local"])
def test_retries_on_idempotent_tasks_only(flavour, request):
    spec, _ = request.getfixturevalue(flavour)
    tasks = tasks_by_name(spec)
    assert {"ingest", "validate", "split", "train"} <= set(configs.RETRIED_TASKS)
    for name in configs.RETRIED_TASKS:
        assert tasks[name][1]["retryPolicy"] == {
            "maxRetryCount": configs.RETRY.num_retries, "backoffDuration": configs.RETRY.backoff_duration,
            "backoffFactor": configs.RETRY.backoff_factor, "backoffMaxDuration": configs.RETRY.backoff_max_duration,
        }, name
    if "notify" in tasks:  # a retried alert would post twice
        assert "retryPolicy" not in tasks["notify"][1]


def test_every_task_has_requests_limits_and_a_timeout(compiled):
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{name}" for name in (*dr.TASK_ORDER, "notify")}
    for executor, body in executors.items():
        wanted = configs.TASK_RESOURCES[executor[len("exec-"):]]
        resources = body["container"]["resources"]
        assert resources["resourceCpuRequest"] == wanted.cpu_request, executor
        assert resources["resourceCpuLimit"] == wanted.cpu_limit, executor
        assert resources["resourceMemoryRequest"] == wanted.memory_request, executor
        assert resources["resourceMemoryLimit"] == wanted.memory_limit, executor
        assert k8s[executor]["activeDeadlineSeconds"] == str(wanted.timeout_seconds), executor


def test_train_requests_a_gpu_node(compiled):
    spec, platform = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(resources["accelerator"]["resourceCount"]) == 1
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [name for name, body in k8s.items() if "nodeSelector" in body] == ["exec-train"]  # only train
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {dr.GPU_NODE_LABEL[0]: dr.GPU_NODE_LABEL[1]}
    assert k8s["exec-train"]["tolerations"] == [dr.GPU_TOLERATION]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == apem_kfp.components.APEM_IMAGE, name
        assert "pip install" not in " ".join(executor["container"]["command"]), name


def test_parameters_present_with_types(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "run_date": "STRING", "window_days": "NUMBER_INTEGER", "raw_uri": "STRING", "output_root": "STRING",
        "negative_rate": "NUMBER_DOUBLE", "model_name": "STRING", "model_params": "STRING",
        "epochs": "NUMBER_INTEGER", "batch_size": "NUMBER_INTEGER", "lr": "NUMBER_DOUBLE",
        "mlflow_tracking_uri": "STRING", "registered_model_name": "STRING", "serving_uri": "STRING",
        "alpha": "NUMBER_DOUBLE", "two_sided": "BOOLEAN", "primary_task": "STRING",
        "primary_tolerance": "NUMBER_DOUBLE", "chance_margin": "NUMBER_DOUBLE", "webhook_url": "STRING",
    }
    assert {k: params[k]["parameterType"] for k in expected} == expected
    assert params["run_date"]["defaultValue"] == ""  # empty: the day before the scheduled time
    assert params["alpha"]["defaultValue"] == 0.05
    # configs.py is the one source of defaults
    for name, value in configs.DEFAULTS.to_dict().items():
        assert params[name].get("defaultValue", "") == value, name


def test_committed_component_yamls_are_up_to_date(tmp_path):
    fresh = compile_components(str(tmp_path))
    names = [os.path.basename(p) for p in fresh]
    match, mismatch, errors = filecmp.cmpfiles(COMPONENT_DIR, str(tmp_path), names, shallow=False)
    assert not mismatch and not errors, f"run `python -m apem_kfp.components.compile_components`: {mismatch + errors}"


@pytest.mark.parametrize("name", apem_kfp.components.COMPONENT_NAMES)
def test_component_yaml_loads_and_matches_the_python_component(name):
    path = os.path.join(COMPONENT_DIR, f"{name}.yaml")
    loaded = load_component_from_file(path)
    original = getattr(__import__(f"apem_kfp.components.{name}", fromlist=[name]), name)
    assert loaded.name == name
    assert loaded.component_spec.inputs.keys() == original.component_spec.inputs.keys()
    assert (loaded.component_spec.outputs or {}).keys() == (original.component_spec.outputs or {}).keys()
    if name == "push":  # the YAML documents where the gate lives
        with open(path) as fh:
            assert "dsl.If(evaluate.blessed == True)" in fh.read().split("\n\n")[0]


def test_loaded_components_compose_into_another_pipeline(tmp_path):
    ingest = load_component_from_file(os.path.join(COMPONENT_DIR, "ingest.yaml"))
    validate = load_component_from_file(os.path.join(COMPONENT_DIR, "validate.yaml"))

    @dsl.pipeline(name="ingest-and-validate")
    def reuse(raw_uri: str, run_date: str):
        got = ingest(raw_uri=raw_uri, run_date=run_date, window_days=1, schedule_time="",
                     attribution_window_days=3)
        validate(dataset=got.outputs["dataset"], output_root="", warn_only=True)

    out = str(tmp_path / "reuse.yaml")
    compiler.Compiler().compile(reuse, package_path=out)
    with open(out) as fh:
        tasks = yaml.safe_load(fh)["root"]["dag"]["tasks"]
    assert tasks["validate"]["dependentTasks"] == ["ingest"]
    assert set(inspect.signature(dr.daily_retrain.pipeline_func).parameters) >= {"raw_uri", "run_date"}


def test_ingest_and_validate_take_the_data_engine_and_beam_options_from_the_pipeline(compiled):
    """Dataflow for ingest and statistics by config alone: prod sets data_engine=beam, and both
    tasks read it (and the Beam runner and options) from the pipeline's parameters."""
    spec, _ = compiled
    tasks = tasks_by_name(spec)
    for name in ("ingest", "validate"):
        inputs = tasks[name][1]["inputs"]["parameters"]
        wired = {k: inputs[k]["componentInputParameter"].removeprefix("pipelinechannel--")
                 for k in ("engine", "beam_runner", "beam_args")}
        assert wired == {"engine": "data_engine", "beam_runner": "beam_runner", "beam_args": "beam_args"}, name
    assert configs.DEFAULTS.data_engine == "local" and configs.environment_parameters("prod")["data_engine"] == "beam"


def test_validate_shows_statistics_html_and_anomalies_markdown_in_the_run_page(compiled):
    spec, _ = compiled
    outputs = spec["components"]["comp-validate"]["outputDefinitions"]["artifacts"]
    assert outputs["statistics_html"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
