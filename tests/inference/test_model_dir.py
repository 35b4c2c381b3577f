import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from apem.inference.calibration import recalibrate
from apem.data.encoding import FeatureEncoder
from apem.inference.export import export_torchscript
from apem.inference.model_dir import ModelDirError, load_model, save_model
from apem.models.registry import build_model
from apem.data.spec import Dataset, write_dataset
from apem.data.features import default_spec
from apem.research.synth import SynthConfig, generate
from apem.train.trainer import TrainConfig, encode_dataset, fit
from apem.inference.predict import predict

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelio")
    table, _ = generate(SynthConfig(rows=4_000, days=4, seed=5))
    spec = default_spec()
    train = Dataset(spec, table.slice(0, 3_000))
    write_dataset(table.slice(3_000), spec, str(root / "test"))
    encoder = FeatureEncoder(spec).fit(train)
    model = build_model("apem_wo_ps", encoder.fields, 3, {"inducing_points": 8, "layers": 2})
    fit(model, encode_dataset(train, encoder), None, TrainConfig(epochs=1, batch_size=512, progress=False))
    model.set_training_progress(300)
    out = save_model(str(root / "model"), model, encoder, spec, extra_meta={"negative_rate": 0.5})
    return root, out, model, encoder, table.slice(3_000)


def test_round_trip_predicts_identically_with_weights_only(saved):
    root, out, model, encoder, test_table = saved
    assert sorted(os.listdir(out)) == ["config.json", "features.json", "weights.pt"]
    torch.load(os.path.join(out, "weights.pt"), weights_only=True)  # plain tensors, no pickled modules
    loaded = load_model(out)
    assert loaded.name == "apem_wo_ps" and loaded.model.config.task_indicators is False
    assert float(loaded.model.gamma) == float(model.gamma)
    expected = predict(model, torch.from_numpy(encoder.transform(test_table)))
    raw = loaded.predict_table(test_table, recalibrate=False)
    np.testing.assert_allclose(raw, expected, rtol=1e-6)
    np.testing.assert_allclose(loaded.predict_table(test_table), recalibrate(expected, 0.5), rtol=1e-6)
    probs, dataset = loaded.predict_dataset(str(root / "test"))
    assert probs.shape == (len(dataset), 3)


def test_unseen_categories_map_to_oov_at_serving(saved):
    _, out, _, _, test_table = saved
    loaded = load_model(out)
    idx = test_table.schema.get_field_index("product_id")
    novel = test_table.set_column(idx, "product_id", pa.array(["never-seen"] * test_table.num_rows))
    probs = loaded.predict_table(novel)
    assert np.isfinite(probs).all()


def test_torchscript_export_matches(saved, tmp_path):
    _, out, _, encoder, test_table = saved
    path = export_torchscript(out, str(tmp_path / "serve" / "model.pt"))
    scripted = torch.jit.load(path)
    x = torch.from_numpy(encoder.transform(test_table))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x).numpy(), load_model(out).predict_table(test_table, recalibrate=False),
                                   rtol=1e-5, atol=1e-7)
        assert scripted(x[:3]).shape == (3, 3)  # batch size is not baked into the trace


def test_clear_errors_for_bad_model_dirs(saved, tmp_path):
    _, out, _, _, _ = saved
    with pytest.raises(ModelDirError, match="not found"):
        load_model(str(tmp_path / "nope"))
    for missing in ("config.json", "features.json", "weights.pt"):
        broken = tmp_path / f"no-{missing}"
        os.makedirs(broken)
        for name in os.listdir(out):
            if name != missing:
                (broken / name).write_bytes(open(os.path.join(out, name), "rb").read())
        with pytest.raises(ModelDirError, match=missing):
            load_model(str(broken))
    future = tmp_path / "future"
    os.makedirs(future)
    config = json.load(open(os.path.join(out, "config.json")))
    (future / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelDirError, match="format version 99"):
        load_model(str(future))
    corrupt = tmp_path / "corrupt"
    os.makedirs(corrupt)
    for name in ("config.json", "features.json"):
        (corrupt / name).write_bytes(open(os.path.join(out, name), "rb").read())
    (corrupt / "weights.pt").write_bytes(b"not a zip")
    with pytest.raises(ModelDirError, match="cannot load weights"):
        load_model(str(corrupt))


def test_save_replaces_existing_directory_atomically(saved, tmp_path):
    _, out, model, encoder, _ = saved
    target = tmp_path / "m"
    save_model(str(target), model, encoder, default_spec())
    (target / "stale.txt").write_text("old")  # an earlier model directory is ours to replace
    save_model(str(target), model, encoder, default_spec())
    assert sorted(os.listdir(target)) == ["config.json", "features.json", "weights.pt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".m.")] == []


def test_save_refuses_a_directory_it_did_not_write(saved, tmp_path):
    from apem.data.ownership import OutputRefused

    _, _, model, encoder, _ = saved
    target = tmp_path / "m"
    os.makedirs(target / "sub")
    (target / "sub" / "keep").write_text("user data")
    with pytest.raises(OutputRefused, match=f"{target}: exists and is not a model directory.*--overwrite"):
        save_model(str(target), model, encoder, default_spec())
    assert (target / "sub" / "keep").read_text() == "user data"
    save_model(str(target), model, encoder, default_spec(), overwrite=True)  # a deliberate replacement
    assert sorted(os.listdir(target)) == ["config.json", "features.json", "weights.pt"]


@pytest.mark.parametrize("name, builds", [("apem", True), ("esmm", False)])
def test_warm_up_builds_the_kernels_the_model_predicts_with(saved, tmp_path, name, builds):
    """The served model (``apem.inference.serving``) warms up as MLflow loads it: a model that predicts through
    APEM's C kernels has them built then (in a fresh process with an empty kernel cache, as in a new serving pod),
    and one that does not builds nothing."""
    import subprocess
    import sys

    from apem.nn.native import load_kernels

    if builds and load_kernels() is None:
        pytest.skip("no C compiler to build the kernels")
    root, _, _, encoder, _ = saved
    model_dir = save_model(str(tmp_path / name), build_model(name, encoder.fields, 3).eval(), encoder, default_spec())
    cache = tmp_path / "kernel-cache"
    load_as_served = ("import sys, types; from apem.inference.serving import ApemServingModel; "
                      "ApemServingModel().load_context(types.SimpleNamespace(artifacts={'model_dir': sys.argv[1]}))")
    subprocess.run([sys.executable, "-c", load_as_served, model_dir],
                   env={**os.environ, "APEM_KERNEL_CACHE": str(cache)}, check=True, timeout=300)
    built = sorted(p.name for p in cache.glob("apem-kernels-*.so")) if cache.exists() else []
    assert len(built) == (1 if builds else 0), built
