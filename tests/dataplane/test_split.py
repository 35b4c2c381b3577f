"""Real Beam pipelines (DirectRunner, in-memory mode with one worker to keep the suite fast)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from apem.data import storage
from apem.inference.calibration import recalibrate
from apem.cli.main import main as apem_main
from apem.data.spec import read_dataset, write_dataset
from apem.data.split_record import SPLITS
from apem.dataplane.split import SplitError, keep_negatives, plan_boundaries, split_dataset, stable_hash
from apem.data.features import default_spec
from apem.data.oracle import ORACLE_DIR, ORACLE_FILE, read_generator
from apem.research.synth import SynthConfig, generate, write_synthetic_dataset

FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
RATE = 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    data = str(root / "data")
    write_synthetic_dataset(SynthConfig(rows=6000, days=10, seed=3), data)
    full = split_dataset(data, str(root / "full"), negative_rate=1.0, pipeline_args=FAST)
    # the sampled run goes through the CLI: unknown options reach Beam as pipeline options
    code = apem_main(["split", "--data", data, "--out", str(root / "sampled"), "--neg-rate", str(RATE),
                      *FAST])
    assert code == 0
    sampled = json.load(open(root / "sampled" / "split.json"))
    return root, data, full, sampled


def _ids(path):
    return set(read_dataset(str(path)).table.column("impression_id").to_pylist())


def test_chronological_whole_days_no_leakage(runs):
    root, data, full, _ = runs
    everything = read_dataset(data).table
    tables = {s: read_dataset(str(root / "full" / s)).table for s in SPLITS}
    days = {s: pc.cast(pc.cast(t.column("event_time"), pa.date32()), pa.int32()).to_numpy() for s, t in tables.items()}
    assert days["train"].max() < days["val"].min() and days["val"].max() < days["test"].min()
    b = full["boundaries"]
    assert b["train"][0] == "2026-01-01" and b["test"][1] == "2026-01-10"
    assert b["train"][1] < b["val"][0] <= b["val"][1] < b["test"][0]
    # every row lands in exactly one split when nothing is sampled
    ids = [_ids(root / "full" / s) for s in SPLITS]
    assert sum(map(len, ids)) == everything.num_rows == len(set.union(*ids))
    shares = np.array([len(i) for i in ids]) / everything.num_rows
    assert abs(shares[0] - 0.8) < 0.1 and 0 < shares[1] < 0.2 and 0 < shares[2] < 0.2
    for s in SPLITS:
        assert full["rows"][s]["before_sampling"] == full["rows"][s]["after_sampling"] == tables[s].num_rows
    assert full["ratios"] == [8, 1, 1] and full["negative_rate"] == 1.0


def test_downsampling_train_only_deterministic(runs):
    root, _, full, sampled = runs
    assert sampled["negative_rate"] == RATE and sampled["boundaries"] == full["boundaries"]
    for s in ("val", "test"):
        assert _ids(root / "sampled" / s) == _ids(root / "full" / s)
    train_full = read_dataset(str(root / "full" / "train")).table
    train = read_dataset(str(root / "sampled" / "train")).table
    clicked = lambda t: set(t.filter(pc.equal(t.column("click"), 1)).column("impression_id").to_pylist())  # noqa: E731
    assert clicked(train) == clicked(train_full)  # every positive of the first step is kept
    negatives_full = train_full.filter(pc.equal(train_full.column("click"), 0))
    kept = train.num_rows - len(clicked(train))
    assert abs(kept / negatives_full.num_rows - RATE) < 0.03
    # the kept set is a pure function of the ids: the same as the hash rule applied to the full train
    expected = set(negatives_full.column("impression_id").filter(
        pa.array(keep_negatives(negatives_full.column("impression_id"), RATE))).to_pylist())
    assert _ids(root / "sampled" / "train") - clicked(train) == expected
    assert sampled["rows"]["train"] == {"before_sampling": train_full.num_rows, "after_sampling": train.num_rows}


def test_downsampling_same_on_other_batching(runs, tmp_path):
    root, data, _, _ = runs
    ds = read_dataset(data)
    rebatched = str(tmp_path / "rebatched")
    write_dataset(ds.table.slice(0).take(np.random.default_rng(0).permutation(len(ds))), ds.spec, rebatched,
                  rows_per_file=1500)
    split_dataset(rebatched, str(tmp_path / "out"), negative_rate=RATE, pipeline_args=FAST)
    for s in SPLITS:
        assert _ids(tmp_path / "out" / s) == _ids(root / "sampled" / s)


def test_stable_hash_matches_reference_fnv1a_splitmix():
    def reference(text):
        h = 0xCBF29CE484222325
        for byte in text.encode():
            h = ((h ^ byte) * 0x100000001B3) % 2**64
        h = (h + 0x9E3779B97F4A7C15) % 2**64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % 2**64
        return h ^ (h >> 31)

    ids = ["imp0000000001", "", "ü-ünïcode", "x" * 40]
    assert stable_hash(pa.array(ids)).tolist() == [reference(i) for i in ids]
    assert stable_hash(pa.array([17, 4])).tolist() == [reference("17"), reference("4")]
    assert stable_hash(pa.array(ids).dictionary_encode()).tolist() == [reference(i) for i in ids]


def test_oracle_follows_each_split(runs):
    root, data, _, _ = runs
    for s in SPLITS:
        oracle = pq.read_table(str(root / "sampled" / s / ORACLE_DIR / ORACLE_FILE))
        assert set(oracle.column("impression_id").to_pylist()) == _ids(root / "sampled" / s)
        # so does the generator's record, which the attainable reference regenerates the draws from
        assert read_generator(str(root / "sampled" / s)) == read_generator(data)
    assert read_generator(data)["config"]["seed"] == 3


def test_recalibrated_rates_match_entire_space(runs):
    """Empirical funnel rates per product type in the downsampled train set, recalibrated with the
    recorded rate, match the entire-space rates of the same days."""
    root, _, _, sampled = runs
    full = read_dataset(str(root / "full" / "train")).table.to_pandas()
    down = read_dataset(str(root / "sampled" / "train")).table.to_pandas()
    steps = ["click", "authorize", "convert"]
    p = down.groupby("product_type")[steps].mean()
    truth = full.groupby("product_type")[steps].mean().loc[p.index]
    q = recalibrate(p.to_numpy(), sampled["negative_rate"])
    assert np.all(p["click"].to_numpy() > 2.5 * truth["click"].to_numpy())  # sampled space is far off
    np.testing.assert_allclose(q[:, 0], truth["click"], rtol=0.15)
    np.testing.assert_allclose(q[:, 1], truth["authorize"], rtol=0.15)
    overall = recalibrate(down[steps].mean().to_numpy()[None, :], RATE)[0]
    np.testing.assert_allclose(overall, full[steps].mean().to_numpy(), rtol=0.1)


def test_plan_and_errors(tmp_path):
    assert plan_boundaries({0: 10, 1: 10, 2: 10}) == {"train": (0, 0), "val": (1, 1), "test": (2, 2)}
    plan = plan_boundaries({d: 100 for d in range(20)}, ratios=(6, 2, 2))
    assert plan == {"train": (0, 11), "val": (12, 15), "test": (16, 19)}
    with pytest.raises(SplitError, match="at least 3 days"):
        plan_boundaries({0: 5, 1: 5})
    table, _ = generate(SynthConfig(rows=300, days=2, seed=0))
    write_dataset(table, default_spec(), str(tmp_path / "two_days"))
    with pytest.raises(SplitError, match="at least 3 days"):
        split_dataset(str(tmp_path / "two_days"), str(tmp_path / "out"), pipeline_args=FAST)
    assert not (tmp_path / "out").exists()
    (tmp_path / "no_spec").mkdir()
    with pytest.raises(SplitError, match="spec file not found"):
        split_dataset(str(tmp_path / "no_spec"), str(tmp_path / "out"), pipeline_args=FAST)
    assert apem_main(["split", "--data", str(tmp_path / "two_days"), "--out", str(tmp_path / "o"),
                      "--neg-rate", "0"]) == 2


def test_split_reads_and_writes_gcs(runs, gcs_prefix):
    """The same pipeline on gs:// paths (Beam's GCS filesystem against the emulator) gives the same split."""
    root, data, _, sampled = runs
    remote_data = storage.join(gcs_prefix, "data")
    storage.upload_dir(data, remote_data)
    remote_out = storage.join(gcs_prefix, "split")
    summary = split_dataset(remote_data, remote_out, negative_rate=RATE, pipeline_args=FAST)
    assert summary["rows"] == sampled["rows"] and summary["boundaries"] == sampled["boundaries"]
    assert storage.exists(storage.join(remote_out, storage.SUCCESS_MARKER))
    for s in SPLITS:
        remote_ids = set(storage.read_dataset_at(storage.join(remote_out, s)).table.column("impression_id").to_pylist())
        assert remote_ids == _ids(root / "sampled" / s)


def test_default_multi_process_direct_runner_gives_the_same_split(runs, tmp_path):
    """The CLI default: DirectRunner in multi-process mode (worker processes, ~30 s to start here)."""
    root, data, _, sampled = runs
    summary = split_dataset(data, str(tmp_path / "mp"), negative_rate=RATE, pipeline_args=["--direct_num_workers=2"])
    assert summary["rows"] == sampled["rows"]
    for s in SPLITS:
        assert _ids(tmp_path / "mp" / s) == _ids(root / "sampled" / s)
