import filecmp
import os

import numpy as np
import pytest
import yaml

from apem.release import mlflow_registry as reg


def make_model_dir(path, marker):
    os.makedirs(os.path.join(path, "features"), exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        fh.write(f'{{"marker": "{marker}"}}')
    with open(os.path.join(path, "features", "vocab.json"), "w") as fh:
        fh.write("{}")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return reg.sqlite_tracking_uri(str(root)), root


def test_no_champion_before_anything_is_registered(store):
    uri, _ = store
    assert reg.champion_version(uri, "nobody") is None
    assert reg.download_champion(uri, "nobody", "/tmp/unused") is None


def test_register_alias_and_download_round_trip(store, tmp_path):
    uri, root = store
    first = reg.register_model(make_model_dir(str(tmp_path / "m1"), "one"), uri, "apem-test",
                               run_name="first", metrics={"auc_convert": 0.7}, params={"epochs": 2})
    assert first.version == "1" and first.model_uri == "models:/apem-test/1"
    assert reg.champion_version(uri, "apem-test") is None  # registering does not promote
    second = reg.register_model(make_model_dir(str(tmp_path / "m2"), "two"), uri, "apem-test")
    assert second.version == "2"

    reg.set_champion(uri, "apem-test", first.version)
    assert reg.champion_version(uri, "apem-test") == "1"
    champion = reg.download_champion(uri, "apem-test", str(tmp_path / "dl1"))
    assert champion.version == "1"
    assert filecmp.cmpfiles(str(tmp_path / "m1"), champion.model_dir, ["config.json", "features/vocab.json"],
                            shallow=False)[0] == ["config.json", "features/vocab.json"]

    reg.set_champion(uri, "apem-test", second.version)
    champion = reg.download_champion(uri, "apem-test", str(tmp_path / "dl2"))
    with open(os.path.join(champion.model_dir, "config.json")) as fh:
        assert '"two"' in fh.read()

    # artifacts live beside the sqlite store, not in the working directory
    assert (root / "artifacts").is_dir()
    # the registered version is a model from code: the serving file, no pickled object
    model_root = os.path.dirname(os.path.dirname(champion.model_dir))
    with open(os.path.join(model_root, "MLmodel")) as fh:
        flavor = yaml.safe_load(fh)["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert os.path.basename(flavor["model_code_path"]) == "serving.py"
    assert not [f for f in os.listdir(model_root) if f.endswith((".pkl", ".pickle"))]


def test_clear_errors(store, tmp_path):
    uri, _ = store
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        reg.register_model(str(tmp_path / "missing"), uri, "apem-test")
    with pytest.raises(ValueError, match="tracking URI is required"):
        reg.champion_version("", "apem-test")


def test_registered_pyfunc_serves_the_same_predictions(store, tmp_path):
    """The models-from-code pyfunc, loaded through the alias, predicts like apem.inference.model_dir."""
    import mlflow
    import torch

    from apem.inference.model_dir import load_model
    from apem.data.spec import write_dataset
    from apem.data.features import default_spec
    from apem.research.synth import SynthConfig, generate
    from apem.train.trainer import TrainConfig
    from apem.train.from_dirs import train_from_dirs

    torch.set_num_threads(2)
    table = generate(SynthConfig(rows=1500, days=3, seed=5))[0]
    write_dataset(table, default_spec(), str(tmp_path / "data"))
    model_dir = str(tmp_path / "model")
    train_from_dirs(str(tmp_path / "data"), str(tmp_path / "data"), model_dir, model_name="esmm",
                    model_overrides={"embed_dim": 4, "tower_hidden": [8]},
                    config=TrainConfig(epochs=1, batch_size=512, progress=False), negative_rate=0.5)
    uri, _ = store
    version = reg.register_model(model_dir, uri, "apem-serve").version
    reg.set_champion(uri, "apem-serve", version)

    frame = table.slice(0, 200).select(list(default_spec().features)).to_pandas()
    frame.loc[0, "user_id"] = "never-seen-user"  # unseen categories go to OOV, never raise
    with reg.tracking(uri):
        served = mlflow.pyfunc.load_model(f"models:/apem-serve@{reg.CHAMPION_ALIAS}").predict(frame)
    import pyarrow as pa

    expected = load_model(model_dir).predict_table(pa.Table.from_pandas(frame, preserve_index=False))
    assert list(served.columns) == ["p_click", "p_authorize", "p_convert"]
    np.testing.assert_allclose(served.to_numpy(), expected, rtol=1e-6)
