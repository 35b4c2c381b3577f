"""The score component from its compiled YAML, as another pipeline reuses it: a real kfp.local run
(SubprocessRunner) of importer -> score on unlabelled rows, with the champion of a temp sqlite
MLflow registry; its predictions equal ``apem predict`` with the champion's model directory."""

import os
import warnings

import pyarrow.parquet as pq
import pytest
from kfp import components, dsl, local

from apem.cli.main import main
from apem_kfp.pipelines.kfp_local_compat import resolve_schedule_time_locally



@pytest.fixture(scope="module")
def scored(tiny_champion, tmp_path_factory):
    import apem_kfp.components as ours

    score = components.load_component_from_file(os.path.join(os.path.dirname(ours.__file__), "score.yaml"))

    @dsl.pipeline(name="score-a-table")
    def score_a_table(data_uri: str, tracking_uri: str, model_uri: str) -> dsl.Dataset:
        rows = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
        return score(data=rows.output, mlflow_tracking_uri=tracking_uri, model_uri=model_uri).outputs["predictions"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path_factory.mktemp("kfp")))
    resolve_schedule_time_locally()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # the tasks run in this venv
        run = score_a_table(data_uri=tiny_champion["unlabelled"], tracking_uri=tiny_champion["tracking_uri"],
                            model_uri=tiny_champion["model_uri"])
    return run.output


def test_score_component_scores_with_the_registry_champion(scored, tiny_champion, tmp_path):
    expected = str(tmp_path / "expected.parquet")
    assert main(["predict", "--model", tiny_champion["model_dir"], "--data", tiny_champion["unlabelled"],
                 "--out", expected]) == 0
    assert pq.read_table(scored.path).equals(pq.read_table(expected))
    assert scored.metadata["registered_version"] == "1" and scored.metadata["rows"] == 300
    assert scored.metadata["model_uri"] == f"models:/{tiny_champion['name']}/1"
    assert scored.metadata["negative_rate"] == 0.5 and scored.metadata["recalibrated"] is True
