"""Each numerical encoding travels with the model directory: train -> save -> load -> predict."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from apem.cli.main import main
from apem.data.features import default_spec
from apem.data.spec import read_dataset, write_dataset
from apem.inference.model_dir import load_model
from apem.research.synth import SynthConfig, generate
from apem.train.from_dirs import split_training_params, train_from_dirs
from apem.train.trainer import TrainConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("encodings")
    table, _ = generate(SynthConfig(rows=3_000, days=3, seed=11))
    spec = default_spec()
    for name, part in (("train", table.slice(0, 2_000)), ("val", table.slice(2_000, 500)), ("test", table.slice(2_500))):
        write_dataset(part, spec, str(root / name))
    return root


@pytest.mark.parametrize("encoding", ["log_round", "dense_log", "quantile:16"])
def test_encoding_round_trips_through_save_load_and_predict(splits, encoding):
    out = splits / f"model-{encoding.replace(':', '-')}"
    summary = train_from_dirs(str(splits / "train"), str(splits / "val"), str(out), model_name="shared_bottom",
                              config=TrainConfig(epochs=1, batch_size=512, progress=False), numerical_encoding=encoding)
    assert summary["numerical_encoding"] == encoding
    features = json.loads((out / "features.json").read_text())
    assert features["numerical_encoding"] == encoding
    loaded = load_model(str(out))
    test = read_dataset(str(splits / "test"))
    assert loaded.encoder.transform(test.table).shape[1] == (22 if encoding == "dense_log" else 16)
    first = loaded.predict_table(test.table)
    assert np.array_equal(first, load_model(str(out)).predict_table(test.table))  # a second reload agrees
    assert main(["predict", "--model", str(out), "--data", str(splits / "test"), "--out", str(out) + ".parquet"]) == 0
    np.testing.assert_array_equal(pq.read_table(str(out) + ".parquet").column("p_convert").to_numpy(), first[:, 2])


def test_dense_log_model_reads_the_numerical_value(splits):
    out = splits / "model-dense-value"
    train_from_dirs(str(splits / "train"), str(splits / "val"), str(out), model_name="apem_wo_asrg",
                    config=TrainConfig(epochs=1, batch_size=512, progress=False), numerical_encoding="dense_log")
    loaded = load_model(str(out))
    row = read_dataset(str(splits / "test")).table.slice(0, 1)
    # ln(1+b)^2 = 92.2 and 92.8 share log_round bucket 92: only the dense value can move the output
    position = row.column_names.index("balance")
    row, twin = (row.set_column(position, "balance", [[float(np.expm1(np.sqrt(v)))]]) for v in (92.2, 92.8))
    both = loaded.predict_table(_concat(row, twin))
    encoded = loaded.encoder.transform(_concat(row, twin))
    bucket = loaded.spec.features.index("balance")
    value = len(loaded.spec.features) + loaded.encoder.dense_fields.index("balance")
    assert encoded[0, bucket] == encoded[1, bucket] and encoded[0, value] != encoded[1, value]
    assert np.array_equal(np.delete(encoded[0], value), np.delete(encoded[1], value))
    assert not np.allclose(both[0], both[1], rtol=0, atol=1e-9)


def _concat(a, b):
    import pyarrow as pa

    return pa.concat_tables([a, b.cast(a.schema)])


def test_cli_train_takes_the_encoding_and_a_bad_one_is_one_line(splits, capsys):
    out = splits / "model-cli"
    assert main(["train", "--train", str(splits / "train"), "--val", str(splits / "val"), "--model", "esmm",
                 "--out", str(out), "--epochs", "1", "--batch-size", "512", "--threads", "1",
                 "--numerical-encoding", "quantile:8", "--embedding-l2-field", "user_id=1e-3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["numerical_encoding"] == "quantile:8"
    config = json.loads((out / "config.json").read_text())
    assert config["meta"]["train_config"]["embedding_l2_fields"] == {"user_id": 1e-3}
    for argv_tail, fragment in ((["--numerical-encoding", "onehot"], "'onehot'"),
                                (["--embedding-l2-field", "user_id"], "FIELD=COEF"),
                                (["--embedding-l2-field", "nosuch=1"], "nosuch")):
        assert main(["train", "--train", str(splits / "train"), "--val", str(splits / "val"), "--out",
                     str(splits / "never"), "--epochs", "1", *argv_tail]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err
    assert not (splits / "never").exists()


def test_model_params_split_into_model_and_training_settings():
    model, training = split_training_params({"embed_dim": 8, "numerical_encoding": "dense_log",
                                             "embedding_l2_fields": {"user_id": 1e-3}})
    assert model == {"embed_dim": 8}
    assert training == {"numerical_encoding": "dense_log", "embedding_l2_fields": {"user_id": 1e-3}}
    with pytest.raises(ValueError, match="'bins:4'"):
        split_training_params({"numerical_encoding": "bins:4"})
