import json
import os

import pytest

from apem.data import storage
from apem.release import mlflow_registry
from apem.release.push import SERVING_POINTER, push, render_report


def make_model_dir(path, marker):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"marker": marker}, fh)
    with open(os.path.join(path, "model.pt"), "wb") as fh:
        fh.write(os.urandom(256))
    return path


@pytest.fixture
def tracking_uri(tmp_path):
    return mlflow_registry.sqlite_tracking_uri(str(tmp_path / "mlflow"))


def test_blessed_registers_moves_alias_and_copies_to_local_serving(tmp_path, tracking_uri):
    serving = str(tmp_path / "serving")
    model = make_model_dir(str(tmp_path / "m1"), "one")
    first = push(model, {"blessed": True, "reasons": ["beats chance"], "champion_version": None},
                 tracking_uri, "apem-push", serving, metrics={"auc_convert": 0.71})
    assert first["pushed"] and first["version"] == "1" and first["previous_champion"] is None
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "1"
    with open(os.path.join(serving, "v1", "config.json")) as fh:
        assert json.load(fh) == {"marker": "one"}
    with open(os.path.join(serving, SERVING_POINTER)) as fh:
        assert json.load(fh)["version"] == "1"

    second = push(make_model_dir(str(tmp_path / "m2"), "two"),
                  {"blessed": True, "reasons": [], "champion_version": "1"}, tracking_uri, "apem-push", serving)
    assert second["pushed"] and second["version"] == "2" and second["previous_champion"] == "1"
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "2"
    assert os.path.isdir(os.path.join(serving, "v1")) and os.path.isdir(os.path.join(serving, "v2"))
    assert "promoted" in render_report(second) and "version **2**" in render_report(second)


def test_not_blessed_changes_nothing(tmp_path, tracking_uri):
    serving = str(tmp_path / "serving")
    push(make_model_dir(str(tmp_path / "m1"), "one"), {"blessed": True, "reasons": []},
         tracking_uri, "apem-push", serving)
    before = sorted(os.listdir(serving)), open(os.path.join(serving, SERVING_POINTER)).read()

    result = push(make_model_dir(str(tmp_path / "m2"), "two"),
                  {"blessed": False, "reasons": ["convert: significantly worse"], "champion_version": "1"},
                  tracking_uri, "apem-push", serving)
    assert not result["pushed"] and result["version"] is None
    assert result["reasons"][0].startswith("not blessed") and "convert: significantly worse" in result["reasons"]
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "1"
    assert (sorted(os.listdir(serving)), open(os.path.join(serving, SERVING_POINTER)).read()) == before
    # no second version was registered
    with mlflow_registry.tracking(tracking_uri) as client:
        assert [str(v.version) for v in client.search_model_versions("name='apem-push'")] == ["1"]
    assert "not promoted" in render_report(result)


def test_champion_moved_since_evaluation_is_refused(tmp_path, tracking_uri):
    push(make_model_dir(str(tmp_path / "m1"), "one"), {"blessed": True, "reasons": []}, tracking_uri, "apem-push")
    stale = push(make_model_dir(str(tmp_path / "m2"), "two"),
                 {"blessed": True, "reasons": [], "champion_version": None}, tracking_uri, "apem-push")
    assert not stale["pushed"] and "champion moved" in stale["reasons"][0]
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "1"


def test_serving_copy_to_gcs(tmp_path, tracking_uri, gcs_prefix):
    model = make_model_dir(str(tmp_path / "m1"), "one")
    result = push(model, {"blessed": True, "reasons": []}, tracking_uri, "apem-push", gcs_prefix)
    assert result["serving_uri"] == f"{gcs_prefix}/v1"
    assert storage.is_complete(result["serving_uri"])
    assert storage.read_bytes(f"{gcs_prefix}/v1/model.pt") == open(os.path.join(model, "model.pt"), "rb").read()
    pointer = json.loads(storage.read_bytes(f"{gcs_prefix}/{SERVING_POINTER}"))
    assert pointer["model_dir"] == f"{gcs_prefix}/v1" and pointer["version"] == "1"


def test_push_re_executed_for_the_same_candidate_changes_nothing(tmp_path, tracking_uri):
    serving = str(tmp_path / "serving")
    push(make_model_dir(str(tmp_path / "m1"), "one"), {"blessed": True, "reasons": []}, tracking_uri, "apem-push",
         serving)
    candidate = make_model_dir(str(tmp_path / "m2"), "two")
    decision = {"blessed": True, "reasons": [], "champion_version": "1"}
    first = push(candidate, decision, tracking_uri, "apem-push", serving)
    pointer = open(os.path.join(serving, SERVING_POINTER)).read()
    with mlflow_registry.tracking(tracking_uri) as client:
        alias_moved_at = client.get_registered_model("apem-push").last_updated_timestamp

    again = push(candidate, decision, tracking_uri, "apem-push", serving)  # a retry of the same task
    assert first["version"] == again["version"] == "2" and again["pushed"]
    assert again["reasons"][0].startswith("already pushed") and again["previous_champion"] == "1"
    with mlflow_registry.tracking(tracking_uri) as client:
        assert sorted(str(v.version) for v in client.search_model_versions("name='apem-push'")) == ["1", "2"]
        assert client.get_registered_model("apem-push").last_updated_timestamp == alias_moved_at
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "2"
    assert open(os.path.join(serving, SERVING_POINTER)).read() == pointer  # the pointer was not rewritten


def test_push_resumes_an_attempt_that_registered_but_did_not_move_the_alias(tmp_path, tracking_uri):
    from apem.release.push import DIGEST_TAG, model_dir_digest

    candidate = make_model_dir(str(tmp_path / "m1"), "one")
    # an earlier attempt died right after registering: the version exists, the alias does not
    mlflow_registry.register_model(candidate, tracking_uri, "apem-push",
                                   version_tags={DIGEST_TAG: model_dir_digest(candidate)})
    result = push(candidate, {"blessed": True, "reasons": [], "champion_version": None}, tracking_uri, "apem-push")
    assert result["pushed"] and result["version"] == "1"
    assert mlflow_registry.champion_version(tracking_uri, "apem-push") == "1"
    with mlflow_registry.tracking(tracking_uri) as client:
        assert [str(v.version) for v in client.search_model_versions("name='apem-push'")] == ["1"]
