"""Render the Kustomize overlays with kubectl and check what a cluster would receive."""

import inspect
import os
import shutil
import subprocess

import pytest
import yaml

from apem_kfp.pipelines import configs
from apem_kfp.pipelines import daily_retrain as dr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERLAYS = {"dev": "apem-dev", "prod": "apem-prod"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, "infra", "overlays", overlay)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request):
    return request.param, render(request.param)


def test_everything_lives_in_the_apem_namespace(rendered):
    _, objects = rendered
    assert ("Namespace", "apem") in objects
    for (kind, name), obj in objects.items():
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "apem", (kind, name)


def test_mlflow_server_uses_postgres_and_gcs_artifacts(rendered):
    overlay, objects = rendered
    server = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    container = server["containers"][0]
    args = " ".join(container["args"])
    assert "--backend-store-uri=postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACT_ROOT)" in args and "--serve-artifacts" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    root_ref = env["MLFLOW_ARTIFACT_ROOT"]["valueFrom"]["configMapKeyRef"]
    defaults = objects[("ConfigMap", root_ref["name"])]["data"]
    assert defaults[root_ref["key"]].startswith(f"gs://{OVERLAYS[overlay]}-mlflow/")
    # the backend store the URI points at exists, with its own volume
    assert ("Service", "mlflow-postgres") in objects
    postgres = objects[("StatefulSet", "mlflow-postgres")]
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    # and the pipeline's default tracking URI is this service
    service = objects[("Service", "mlflow")]
    port = service["spec"]["ports"][0]["port"]
    assert configs.DEFAULTS.mlflow_tracking_uri == f"http://mlflow.apem.svc.cluster.local:{port}"


def test_pipeline_identity_uses_workload_identity_and_no_keys(rendered):
    overlay, objects = rendered
    for account in ("apem-pipeline-runner", "mlflow"):
        annotation = objects[("ServiceAccount", account)]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert annotation.endswith(f"@{OVERLAYS[overlay]}.iam.gserviceaccount.com")
    binding = objects[("RoleBinding", "apem-pipeline-runner")]
    assert binding["roleRef"]["name"] == "apem-pipeline-runner"
    assert {"kind": "ServiceAccount", "name": "apem-pipeline-runner"}.items() <= binding["subjects"][0].items()
    assert ("Role", "apem-pipeline-runner") in objects
    text = yaml.safe_dump(list(objects.values()))
    assert "Secret" not in {kind for kind, _ in objects}  # created out of band, never rendered from git
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "PROJECT_ID" not in text


def test_gpu_placement_matches_the_pipeline(rendered):
    _, objects = rendered
    spec = objects[("PodDefault", "apem-gpu")]["spec"]
    assert spec["selector"]["matchLabels"] == {dr.GPU_POD_LABEL[0]: dr.GPU_POD_LABEL[1]}
    assert spec["tolerations"] == [dr.GPU_TOLERATION]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": dr.GPU_NODE_LABEL[0], "operator": "In",
                                         "values": [dr.GPU_NODE_LABEL[1]]}]


def test_one_source_of_pipeline_defaults(rendered):
    overlay, objects = rendered
    # no ConfigMap repeats the pipeline's parameters: configs.py is their one home
    assert not [name for kind, name in objects if kind == "ConfigMap" and name != "apem-mlflow"]
    environment = configs.environment_parameters(overlay)
    parameters = inspect.signature(dr.daily_retrain.pipeline_func).parameters
    assert set(environment) <= set(parameters), set(environment) - set(parameters)
    for key in ("raw_uri", "output_root", "serving_uri"):
        assert environment[key].startswith(f"gs://{OVERLAYS[overlay]}-")
    for key, value in environment.items():  # every value has its parameter's type
        assert isinstance(value, parameters[key].annotation), key


def test_serving_runs_mlflow_models_serve_on_the_champion_in_the_component_image(rendered):
    from apem_kfp.components import APEM_IMAGE

    _, objects = rendered
    pod = objects[("Deployment", "apem-serving")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == APEM_IMAGE
    assert container["command"] == ["mlflow", "models", "serve"]
    assert {"--model-uri=models:/apem@champion", "--env-manager=local", "--port=8080"} <= set(container["args"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == configs.DEFAULTS.mlflow_tracking_uri  # the registry push writes to
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_serving_has_probes_resources_and_a_service(rendered):
    _, objects = rendered
    container = objects[("Deployment", "apem-serving")]["spec"]["template"]["spec"]["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/ping"  # loading the champion takes a while
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind
    service = objects[("Service", "apem-serving")]["spec"]
    assert service["selector"] == {"app.kubernetes.io/name": "apem-serving"}
    assert service["ports"][0]["targetPort"] == "http" and port == 8080


def test_serving_network_policy_admits_only_its_clients(rendered):
    _, objects = rendered
    policy = objects[("NetworkPolicy", "apem-serving")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "apem-serving"}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = policy["ingress"]
    sources = [peer["namespaceSelector"]["matchLabels"] for peer in rule["from"]]
    assert sources == [{"kubernetes.io/metadata.name": "apem"}, {"apem.io/scoring-client": "true"}]
    assert all(set(peer) == {"namespaceSelector"} for peer in rule["from"])  # no open podSelector-only peer
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    egress_targets = [peer for r in policy["egress"] for peer in r["to"]]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}} in egress_targets
