import json
import os

import numpy as np
import pytest
import torch

from apem.data.encoding import FeatureEncoder
from apem.eval.metrics import auc
from apem.models.registry import build_model
from apem.data.spec import Dataset, write_dataset
from apem.data.features import default_spec
from apem.research.synth import SynthConfig, generate
from apem.train.trainer import TrainConfig, encode_dataset, fit
from apem.inference.predict import predict
from apem.train.from_dirs import train_from_dirs

torch.set_num_threads(1)
SMALL = {"inducing_points": 16, "layers": 2}


def _encoded_split(rows: int, train_rows: int):
    table, _ = generate(SynthConfig(rows=rows, days=10, seed=3))
    spec = default_spec()
    train, val = Dataset(spec, table.slice(0, train_rows)), Dataset(spec, table.slice(train_rows))
    encoder = FeatureEncoder(spec).fit(train)
    return encoder, encode_dataset(train, encoder), encode_dataset(val, encoder)


@pytest.fixture(scope="module")
def encoded():
    return _encoded_split(40_000, 32_000)


@pytest.fixture(scope="module")
def encoded_wide_val():
    """48k validation rows: enough convert positives (~230) to tell a learnt AUC from chance."""
    return _encoded_split(80_000, 32_000)


def test_encoded_data_shapes(encoded):
    encoder, train, _ = encoded
    assert train.x.dtype == torch.int64 and train.x.shape == (32_000, len(encoder.fields))
    assert train.y.dtype == torch.float32 and train.y.shape == (32_000, 3)
    cards = torch.tensor([f.cardinality for f in encoder.fields])
    assert (train.x < cards).all() and (train.x >= 0).all()


def test_training_beats_chance_on_every_task(encoded_wide_val):
    encoder, train, val = encoded_wide_val
    torch.manual_seed(0)  # the initialisation must not depend on which tests ran before
    model = build_model("apem", encoder.fields, 3, SMALL)
    result = fit(model, train, val, TrainConfig(epochs=3, batch_size=256, lr=3e-3, progress=False, patience=3))
    probs = predict(model, val.x)
    aucs = [auc(val.y[:, i].numpy(), probs[:, i]) for i in range(3)]
    for i, value in enumerate(aucs):  # 4 standard errors of a chance-level AUC (Hanley-McNeil under H0) above 0.5
        positives = float(val.y[:, i].sum())
        negatives = len(val) - positives
        chance_se = np.sqrt((positives + negatives + 1) / (12 * positives * negatives))
        assert value > 0.5 + 4 * chance_se, (i, aucs, chance_se)
    assert result.best_val_auc == pytest.approx(np.mean(aucs))  # best state restored
    assert len(result.history) == 3 and result.history[0]["samples_per_s"] > 0
    assert result.steps == 3 * 125


def test_resume_after_interruption_equals_uninterrupted_run(encoded, tmp_path):
    encoder, train, val = encoded
    small_train = type(train)(train.x[:3000], train.y[:3000])
    small_val = type(val)(val.x[:2000], val.y[:2000])

    class KilledInEpoch2(type(train)):
        """The same rows; the run dies when epoch 2 starts, after its second checkpoint."""

        def epoch_batches(self, epoch, batch_size, seed):
            if epoch == 2:
                raise KeyboardInterrupt("killed")
            return super().epoch_batches(epoch, batch_size, seed)

    def run(checkpoint_dir, resume=False, data=small_train):
        torch.manual_seed(123)  # model init differs from the trainer seed on purpose
        model = build_model("apem", encoder.fields, 3, {**SMALL, "dropout": 0.1})
        # the same planned length (4 epochs) in every run: APEM's gamma is scheduled against it
        cfg = TrainConfig(epochs=4, batch_size=256, seed=7, progress=False, patience=10,
                          checkpoint_dir=str(checkpoint_dir), resume=resume)
        return model, fit(model, data, small_val, cfg)

    full_model, full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", data=KilledInEpoch2(small_train.x, small_train.y))
    resumed_model, resumed = run(tmp_path / "killed", resume=True)
    assert [h["val_auc"] for h in resumed.history] == [h["val_auc"] for h in full.history]
    assert resumed.best_epoch == full.best_epoch and resumed.steps == full.steps
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert json.loads(ckpt["progress"])["next_epoch"] == 4


def test_train_from_dirs_reads_negative_rate_and_logs_to_mlflow(tmp_path):
    table, _ = generate(SynthConfig(rows=6_000, days=5, seed=4))
    spec = default_spec()
    write_dataset(table.slice(0, 5_000), spec, str(tmp_path / "split" / "train"))
    write_dataset(table.slice(5_000), spec, str(tmp_path / "split" / "val"))
    (tmp_path / "split" / "split.json").write_text(json.dumps({"negative_rate": 0.25}))
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)  # artifacts beside the store, not in the working directory
        mlflow.create_experiment("apem", artifact_location=(tmp_path / "artifacts").as_uri())
        summary = train_from_dirs(str(tmp_path / "split" / "train"), str(tmp_path / "split" / "val"),
                                  str(tmp_path / "model"), "apem_wo_ld", model_overrides=SMALL,
                                  config=TrainConfig(epochs=1, progress=False, mlflow_tracking_uri=uri))
        assert summary["negative_rate"] == 0.25 and summary["model"] == "apem_wo_ld"
        meta = json.loads((tmp_path / "model" / "config.json").read_text())
        assert meta["meta"]["negative_rate"] == 0.25 and meta["loss"]["dependence_weights"] == 0.0
        assert not os.path.exists(tmp_path / "model.checkpoints")  # a finished run removes its checkpoint

        runs = mlflow.search_runs(experiment_names=["apem"], output_format="list")
        assert len(runs) == 1
        run = runs[0]
        assert run.data.params["model.name"] == "apem_wo_ld"
        assert "val_auc_mean" in run.data.metrics and "samples_per_s" in run.data.metrics
        assert {"val_auc_click", "val_auc_authorize", "val_auc_convert"} <= set(run.data.metrics)  # named by task
        assert summary["mlflow_run_id"] == run.info.run_id and "best_val_auc_convert" in summary
        # "model_dir", not "model": push logs the registered pyfunc as "model" into this same run
        artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model_dir")]
        assert "model_dir/weights.pt" in artifacts and "model_dir/config.json" in artifacts
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_best_epoch_is_chosen_only_after_the_selector_is_sharp(encoded):
    """On 4096 rows APEM's validation AUC peaks at epoch 0 (seed 0), when gamma is still ~3 (a soft
    f_D): without the schedule rule that epoch would be restored. With it (floor at half of the 3
    planned epochs, reached in epoch 1) the first settled epoch replaces it, and the restored model is sharp."""
    from apem.train.trainer import EncodedData

    _, train, val = encoded
    small_train = EncodedData(train.x[:4096], train.y[:4096])
    small_val = EncodedData(val.x[:4096], val.y[:4096])
    torch.manual_seed(0)
    model = build_model("apem", [*encoded[0].fields], 3, {**SMALL, "gamma_schedule": "planned"})
    result = fit(model, small_train, small_val,
                 TrainConfig(epochs=3, batch_size=512, patience=3, seed=0, progress=False, device="cpu"))
    settled = [record["schedule_settled"] for record in result.history]
    assert settled[:2] == [False, True]
    assert result.best_epoch >= 1
    assert model.schedule_settled() and float(model.gamma) == pytest.approx(1e-3)  # the restored state is sharp
    assert result.history[0]["val_auc_mean"] > result.history[result.best_epoch]["val_auc_mean"]  # the rule mattered


def test_models_without_a_schedule_are_always_settled(encoded):
    _, train, _ = encoded
    model = build_model("shared_bottom", [*encoded[0].fields], 3)
    assert model.schedule_settled()


@pytest.mark.parametrize("name", ["apem", "apem_wo_asrg", "shared_bottom", "escm2_dr", "aitm", "ple"])
def test_bf16_autocast_trains_with_float32_weights_and_loss(encoded, name):
    """``precision="bf16"`` (the GPU setting): the forward's matmuls run in bf16, APEM's hand-written
    poolings in float32 outside autocast, the loss in float32; weights stay float32."""
    from apem.train.trainer import EncodedData

    _, train, _ = encoded
    small = EncodedData(train.x[:1024], train.y[:1024])
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(name, encoded[0].fields, 3, SMALL if name.startswith("apem") else None)
        result = fit(model, small, None, TrainConfig(epochs=1, batch_size=256, progress=False, precision=precision))
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
        losses[precision] = result.history[0]["train_loss"]
    assert np.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]  # autocast took effect
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_a_finished_run_removes_the_staging_of_a_killed_checkpoint_write(tmp_path):
    """A run killed inside torch.save leaves its staging beside the checkpoint; the run that finishes removes it
    with the checkpoint and the folder (what tests/cli/test_fault_injection.py caught), and keeps a live
    writer's staging and anything it did not write."""
    from apem.train.checkpoint import CHECKPOINT_FILE, remove_checkpoint

    killed, done = tmp_path / "killed.checkpoints", tmp_path / "shared.checkpoints"
    for folder in (killed, done):
        folder.mkdir()
        (folder / CHECKPOINT_FILE).write_bytes(b"state")
        (folder / f".{CHECKPOINT_FILE}.999999999-abc.tmp").write_bytes(b"partial")  # a pid no process has
    (done / f".{CHECKPOINT_FILE}.{os.getppid()}-abc.tmp").write_bytes(b"live")  # a live writer's
    (done / "notes.txt").write_text("user data")
    remove_checkpoint(str(killed))
    remove_checkpoint(str(done))
    assert not killed.exists()
    assert sorted(os.listdir(done)) == [f".{CHECKPOINT_FILE}.{os.getppid()}-abc.tmp", "notes.txt"]
