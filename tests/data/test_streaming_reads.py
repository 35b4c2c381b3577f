"""Streaming reads (apem.data.streaming) and the streaming vocabulary fit (FeatureEncoder.fit_chunks)."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from apem.data import storage
from apem.data.encoding import FeatureEncoder
from apem.data.features import default_spec
from apem.data.sketches import Reservoir, ValueCounter
from apem.data.spec import Dataset, DatasetError, DatasetSpec
from apem.data.streaming import (ShuffleBuffer, StreamSettings, epoch_units, fit_encoder_streaming, interleave,
                                 list_units, read_spec, read_unit)
from apem.research.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory, write_shards):
    table, _ = generate(SynthConfig(rows=12_000, days=5, seed=11))
    spec = default_spec()
    return table, spec, write_shards(table, spec, tmp_path_factory.mktemp("shards"), files=3, row_group_rows=1_500)


def test_units_are_row_groups_and_workers_share_them_disjointly(synth_shards):
    _, spec, path = synth_shards
    units = list_units(path, spec)
    assert len(units) == 9 and sum(u.rows for u in units) == 12_000
    for epoch in (0, 1):
        dealt = [epoch_units(units, seed=5, epoch=epoch, worker=w, workers=3) for w in range(3)]
        assert sorted(u for part in dealt for u in part) == sorted(units)
    assert epoch_units(units, 5, 0) != epoch_units(units, 5, 1)
    assert epoch_units(units, 5, 1) == epoch_units(units, 5, 1)


@pytest.mark.parametrize("encoding", ["log_round", "dense_log", "quantile:16"])
def test_streaming_fit_equals_the_in_memory_fit(synth_shards, encoding):
    table, spec, path = synth_shards
    in_memory = FeatureEncoder(spec, numerical_encoding=encoding).fit(Dataset(spec, table))
    streamed = FeatureEncoder(spec, numerical_encoding=encoding)
    assert fit_encoder_streaming(path, streamed, StreamSettings(chunk_rows=700)) == 12_000
    assert streamed.to_dict() == in_memory.to_dict()  # vocabularies, kinds and (below the reservoir) edges
    assert np.array_equal(streamed.transform(table), in_memory.transform(table))


def test_quantile_edges_from_a_small_reservoir_are_close(synth_shards):
    table, spec, path = synth_shards
    exact = FeatureEncoder(spec, numerical_encoding="quantile:10").fit(Dataset(spec, table))
    sampled = FeatureEncoder(spec, numerical_encoding="quantile:10")
    fit_encoder_streaming(path, sampled, StreamSettings(chunk_rows=1000), reservoir_rows=3_000)
    assert sampled.categorical_vocab == exact.categorical_vocab
    compared = 0
    for name in spec.numerical:
        values = pc.cast(table.column(name), pa.float64()).to_numpy()
        values = np.sort(values[np.isfinite(values)])
        # compare in rank space: each sampled edge sits within 3 percentiles of the exact one
        ranks = lambda edges: np.searchsorted(values, edges) / len(values)  # noqa: E731
        if len(np.unique(values)) > 1_000:  # continuous fields (ties in counts move edges by whole values)
            assert np.abs(ranks(sampled.quantile_edges[name]) - ranks(exact.quantile_edges[name])).max() < 0.03, name
            compared += 1
    assert compared >= 1
    agree = (sampled.transform(table) == exact.transform(table))[:, len(spec.categorical):].mean(axis=0)
    assert agree.min() > 0.9, agree  # every field bins at least 90% of rows the same


def test_value_counter_merges_across_chunks():
    counter = ValueCounter(merge_rows=3)  # merge nearly every chunk
    chunks = [["a", "b", None], ["b", "c"], ["c", "c", "d"], ["a"]]
    for chunk in chunks:
        counter.add(pa.array(chunk))
    assert counter.at_least(2) == ["a", "b", "c"] and counter.at_least(1) == ["a", "b", "c", "d"]


def test_reservoir_is_exact_below_capacity_and_uniform_above():
    exact = Reservoir(100, np.random.default_rng(0))
    exact.add(np.array([3.0, np.nan, 1.0, np.inf]))
    assert exact.exact and sorted(exact.sample) == [1.0, 3.0]
    sample = Reservoir(2_000, np.random.default_rng(0))
    for begin in range(0, 100_000, 7_000):
        sample.add(np.arange(begin, min(begin + 7_000, 100_000), dtype=float))
    assert not sample.exact and len(sample.sample) == 2_000 and len(set(sample.sample)) == 2_000
    assert abs(np.median(sample.sample) - 50_000) < 4_000  # a uniform sample, not the first or last values


def test_shuffle_buffer_emits_each_row_once_and_never_exceeds_its_capacity():
    buffer = ShuffleBuffer(capacity=256, batch_size=32, rng=np.random.default_rng(1))
    ids = np.arange(1_000)
    out = []
    for begin in range(0, 1_000, 90):
        chunk = ids[begin:begin + 90]
        out.extend(buffer.add(chunk[:, None], chunk[:, None].astype(np.float32)))
    out.extend(buffer.flush())
    rows = np.concatenate([x[:, 0] for x, _ in out])
    assert sorted(rows) == list(ids) and not np.array_equal(rows, ids)
    assert all(len(x) == 32 for x, _ in out[:-1]) and 0 < len(out[-1][0]) <= 32
    assert buffer.max_fill == 256 and buffer.fill == 0
    assert all(np.array_equal(x[:, 0], y[:, 0]) for x, y in out)  # labels travel with their rows


def test_interleave_keeps_at_most_width_streams_open():
    opened = []

    def stream(name):
        opened.append(name)
        yield from (f"{name}{i}" for i in range(2))

    out = list(interleave((stream(n) for n in "abc"), width=2))
    assert out == ["a0", "b0", "a1", "b1", "c0", "c1"] and opened == ["a", "b", "c"]


def test_funnel_policy_applies_chunk_by_chunk(tmp_path, write_shards, caplog):
    spec = DatasetSpec(time_column="t", labels=("a", "b"), categorical=("c",), numerical=("n",), funnel_policy="drop")
    table = pa.table({"t": pa.array([0] * 4, pa.timestamp("s")), "a": [1, 0, 1, 0], "b": [1, 1, 0, 0],
                      "c": ["x", "y", "x", "y"], "n": [1.0, 2.0, 3.0, 4.0]})
    path = write_shards(table, spec, tmp_path / "drop", files=1, row_group_rows=2)
    kept = pa.concat_tables(t for u in list_units(path, spec) for t in read_unit(u, spec, ["a", "b", "n"]))
    assert kept.column("n").to_pylist() == [1.0, 3.0, 4.0]
    with caplog.at_level("WARNING"):
        assert fit_encoder_streaming(path, FeatureEncoder(spec)) == 3
    assert "dropped row(s) violating the funnel order (per step pair: {'a>b': 1})" in caplog.text
    rejecting = DatasetSpec(**{**spec.to_dict(), "funnel_policy": "reject", "labels": ("a", "b"),
                               "categorical": ("c",), "numerical": ("n",)})
    rejecting.write(path)
    with pytest.raises(DatasetError, match=r"part-00000.parquet \(row group 0\): 1 row\(s\) violate the funnel"):
        fit_encoder_streaming(path, FeatureEncoder(read_spec(path)))


def test_streams_a_gs_dataset(synth_shards, gcs_prefix):
    table, spec, path = synth_shards
    uri = storage.join(gcs_prefix, "train")
    storage.upload_dir(path, uri)
    assert read_spec(uri) == spec
    units = list_units(uri, spec)
    assert [(os.path.basename(u.file), u.row_group) for u in units] == \
        [(os.path.basename(u.file), u.row_group) for u in list_units(path, spec)]
    encoder = FeatureEncoder(spec)
    fit_encoder_streaming(uri, encoder, units=units)
    assert encoder.to_dict() == FeatureEncoder(spec).fit(Dataset(spec, table)).to_dict()
