"""Streaming training data (apem.train.streaming) and the trainer's data_loading option."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from apem.data.encoding import FeatureEncoder
from apem.data.features import default_spec
from apem.data.spec import Dataset, DatasetSpec
from apem.data.streaming import StreamSettings, fit_encoder_streaming
from apem.eval.metrics import auc
from apem.inference.model_dir import load_model
from apem.inference.predict import predict
from apem.models.registry import build_model
from apem.research.synth import SynthConfig, generate
from apem.train.from_dirs import choose_data_loading, train_from_dirs
from apem.train.streaming import EncodeRows, StreamingData
from apem.train.trainer import TrainConfig, encode_dataset, fit

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def keep_global_rng():
    """Leave torch's global RNG as found: later modules' tests build models from it (their init)."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)

ROWS = 6_000
SETTINGS = StreamSettings(chunk_rows=500, interleave=2, buffer_rows=2_048)  # buffer well below the row count


def row_ids(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """An ``encode`` that yields each row's id, so a pass can be checked row by row."""
    ids = table.column("row").to_numpy().astype(np.int64)
    return ids[:, None], table.column("a").to_numpy().astype(np.float32)[:, None]


@pytest.fixture(scope="module")
def numbered(tmp_path_factory, write_shards):
    spec = DatasetSpec(time_column="t", labels=("a", "b"), categorical=("c",), numerical=("row",))
    table = pa.table({"t": pa.array(np.zeros(ROWS, np.int64), pa.timestamp("s")), "a": np.ones(ROWS, np.int64),
                      "b": np.arange(ROWS) % 2, "c": np.arange(ROWS) % 7, "row": np.arange(ROWS)})
    return spec, write_shards(table, spec, tmp_path_factory.mktemp("numbered"), files=4, row_group_rows=500)


def epoch_rows(data: StreamingData, epoch: int, seed: int = 3) -> np.ndarray:
    return np.concatenate([x[:, 0].numpy() for x, _ in data.epoch_batches(epoch, 256, seed)])


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_per_epoch_in_a_seeded_order(numbered, workers):
    spec, path = numbered
    data = StreamingData(path, spec, row_ids, workers=workers, settings=SETTINGS)
    first, second = epoch_rows(data, 0), epoch_rows(data, 1)
    assert len(first) == ROWS and np.array_equal(np.sort(first), np.arange(ROWS))
    assert np.array_equal(np.sort(second), np.arange(ROWS))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, epoch_rows(data, 0))  # same seed and epoch: same order
    assert not np.array_equal(first, epoch_rows(data, 0, seed=4))


def test_the_shuffle_buffer_bounds_what_a_pass_holds(numbered):
    spec, path = numbered
    data = StreamingData(path, spec, row_ids, settings=SETTINGS)
    data.buffers = []
    assert len(epoch_rows(data, 0)) == ROWS
    (buffer,) = data.buffers
    assert buffer.max_fill == buffer.capacity == SETTINGS.buffer_rows < ROWS / 2


def test_eval_batches_cover_every_row_in_file_order(numbered):
    spec, path = numbered
    data = StreamingData(path, spec, row_ids, settings=SETTINGS)
    assert np.array_equal(np.concatenate([x[:, 0].numpy() for x, _ in data.eval_batches()]), np.arange(ROWS))


@pytest.fixture(scope="module")
def synth_split(tmp_path_factory, write_shards):
    table, _ = generate(SynthConfig(rows=40_000, days=10, seed=3))
    spec = default_spec()
    root = tmp_path_factory.mktemp("split")
    write_shards(table.slice(0, 32_000), spec, root / "train", files=4, row_group_rows=2_000)
    write_shards(table.slice(32_000), spec, root / "val", files=2, row_group_rows=1_000)
    return table, spec, root


def test_one_streamed_epoch_reaches_the_in_memory_auc(synth_split):
    table, spec, root = synth_split
    encoder = FeatureEncoder(spec)
    rows = fit_encoder_streaming(str(root / "train"), encoder)
    val = encode_dataset(Dataset(spec, table.slice(32_000)), encoder)
    memory = encode_dataset(Dataset(spec, table.slice(0, 32_000)), encoder)
    streamed = StreamingData(str(root / "train"), spec, EncodeRows(encoder), rows=rows, workers=2,
                             settings=StreamSettings(buffer_rows=8_192))
    aucs = {}
    for name, train in (("memory", memory), ("streaming", streamed)):
        torch.manual_seed(0)
        model = build_model("shared_bottom", encoder.fields, 3)
        result = fit(model, train, None, TrainConfig(epochs=1, batch_size=256, lr=3e-3, progress=False))
        assert result.history[0]["rows"] == 32_000
        probs = predict(model, val.x)
        aucs[name] = np.mean([auc(val.y[:, i].numpy(), probs[:, i]) for i in range(3)])
    assert aucs["streaming"] > 0.6 and abs(aucs["streaming"] - aucs["memory"]) < 0.02, aucs


def test_train_from_dirs_streams_and_auto_keeps_small_data_in_memory(synth_split, tmp_path):
    _, _, root = synth_split
    summaries = {}
    for mode in ("streaming", "auto"):
        config = TrainConfig(epochs=1, batch_size=256, lr=3e-3, progress=False, data_loading=mode)
        summaries[mode] = train_from_dirs(str(root / "train"), str(root / "val"), str(tmp_path / mode),
                                          model_name="shared_bottom", config=config, negative_rate=1.0)
    assert summaries["streaming"]["data_loading"] == "streaming" and summaries["auto"]["data_loading"] == "memory"
    assert summaries["streaming"]["train_rows"] == 32_000 and summaries["streaming"]["val_rows"] == 8_000
    assert summaries["streaming"]["best_val_auc"] > 0.6, summaries["streaming"]["best_val_auc"]
    meta = json.loads((tmp_path / "streaming" / "config.json").read_text())["meta"]
    assert meta["data_loading"] == "streaming"
    # the same encoder either way, so a streamed model scores like any other
    assert load_model(str(tmp_path / "streaming")).encoder.to_dict() == \
        load_model(str(tmp_path / "auto")).encoder.to_dict()
    assert not os.path.exists(str(tmp_path / "streaming") + ".checkpoints")


def test_choose_data_loading():
    assert choose_data_loading("auto", 10) == "memory" and choose_data_loading("auto", 10**8) == "streaming"
    assert choose_data_loading("streaming", 10) == "streaming" and choose_data_loading("memory", 10**8) == "memory"
    with pytest.raises(ValueError, match="data_loading must be one of"):
        TrainConfig(data_loading="disk")


def test_streamed_resume_equals_uninterrupted_run(synth_split, tmp_path):
    _, spec, root = synth_split
    shards = str(root / "val")  # the smaller set: resume needs no particular size
    encoder = FeatureEncoder(spec)
    rows = fit_encoder_streaming(shards, encoder)

    def run(epochs, checkpoint_dir, resume=False):
        torch.manual_seed(123)
        model = build_model("shared_bottom", encoder.fields, 3)
        data = StreamingData(shards, spec, EncodeRows(encoder), rows=rows, settings=StreamSettings(buffer_rows=2_048))
        cfg = TrainConfig(epochs=epochs, batch_size=512, seed=7, progress=False, checkpoint_dir=str(checkpoint_dir),
                          resume=resume)
        fit(model, data, None, cfg)
        return model

    full = run(2, tmp_path / "full")
    run(1, tmp_path / "killed")
    resumed = run(2, tmp_path / "killed", resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
