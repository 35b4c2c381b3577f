"""End-to-end throughput of APEM next to a plain embedding-MLP reference, measured in one run.

    .venv/bin/python benchmarks/bench_model.py [--rows 200000] [--threads 2] [--models apem]
    .venv/bin/python benchmarks/bench_model.py --quality --rows 300000 --seeds 0   # test AUC vs oracle

Training is timed from Parquet on disk to a trained model (read, fit features, encode, epochs);
prediction from a saved model directory and Parquet on disk to predictions (load, read, encode,
forward, recalibrate). Absolute numbers depend on the machine and its load, so each model is
also quoted as a ratio against the reference measured in the same process. Prints JSON.

``--quality`` splits ``apem synth`` data chronologically (first 80% of days train, next 10% val,
last 10% test), trains with early stopping and reports test AUC per task, the oracle's AUC on the
same rows and the captured fraction (AUC - 0.5) / (oracle - 0.5).

Where APEM's time goes (torch.profiler, 1 thread, batch 1024, 16 fields, Table 2 sizes, ~250 ms of
CPU per step on a loaded 2-core VM; fractions are rough, the machine was shared):

- ~25%: the six (B, S, L M K) x d products of eq. 15 (factored scores, attention pooling, and their
  gradients), 151M multiply-adds each at batch 1024, via MKL GEMM/bmm with an inner size of 16-18;
- ~25%: combining the pooled heads with W^V_m W^O_m (eq. 16), incl. the permute to (L, B K, M d);
- ~20%: eq. 17's residual and the stacked LayerNorm over (L, B, K, d) (4.7M floats per batch);
- ~12%: the Pattern Selector (eq. 18-19); ~8%: softmax over the fields and its gradient.

With 2 threads on a machine shared by other jobs, OpenMP threads wait on each other: elementwise
passes can run slower than with 1 thread, so compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apem.data.encoding import FeatureEncoder  # noqa: E402
from apem.nn.layers import MLP, FieldEmbedding  # noqa: E402
from apem.eval.metrics import auc  # noqa: E402
from apem.inference.model_dir import load_model, save_model  # noqa: E402
from apem.models.base import ModelOutput, MultiTaskModel  # noqa: E402
from apem.models.registry import build_model  # noqa: E402
from apem.data.spec import read_dataset, write_dataset  # noqa: E402
from apem.data.oracle import read_oracle  # noqa: E402
from apem.research.synth import START_DATE, SynthConfig, write_synthetic_dataset  # noqa: E402
from apem.train.trainer import TrainConfig, encode_dataset, fit  # noqa: E402


class PlainEmbeddingMLP(MultiTaskModel):
    """The reference: field embeddings (d = 18) -> MLP [256, 128, 64] -> one logit per task."""

    name: ClassVar[str] = "plain_mlp"

    @dataclass
    class Config:
        embed_dim: int = 18
        hidden: tuple[int, ...] = (256, 128, 64)

    def __init__(self, fields, n_tasks, config=None, loss_config=None):
        super().__init__(fields, n_tasks, config, loss_config)
        self.embedding = FieldEmbedding(self.fields, self.config.embed_dim)
        self.mlp = MLP(len(self.fields) * self.config.embed_dim, self.config.hidden, out_dim=n_tasks)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput(probs=torch.sigmoid(self.mlp(self.embedding(x).flatten(1))))


def day_split(dataset_dir: str, out_root: str, days: int) -> dict[str, str]:
    """Chronological split by day of event_time: 80% of days train, 10% val, 10% test."""
    ds = read_dataset(dataset_dir)
    start = pa.scalar(np.datetime64(START_DATE.isoformat(), "us"), pa.timestamp("us"))
    day = pc.divide(pc.cast(pc.subtract(ds.table.column(ds.spec.time_column), start), pa.int64()), 86_400_000_000)
    val_from, test_from = int(round(days * 0.8)), int(round(days * 0.9))
    bounds = {"train": (0, val_from), "val": (val_from, test_from), "test": (test_from, days)}
    out = {}
    for name, (lo, hi) in bounds.items():
        mask = pc.and_(pc.greater_equal(day, lo), pc.less(day, hi))
        out[name] = write_dataset(ds.table.filter(mask), ds.spec, os.path.join(out_root, name))
    return out


def build(name: str, fields, n_tasks: int) -> MultiTaskModel:
    if name == "plain_mlp":
        return PlainEmbeddingMLP(fields, n_tasks)
    return build_model(name, fields, n_tasks)


def time_training(name: str, train_dir: str, epochs: int, batch_size: int) -> tuple[dict, MultiTaskModel, FeatureEncoder]:
    torch.manual_seed(0)
    started = time.perf_counter()
    ds = read_dataset(train_dir)
    read_s = time.perf_counter() - started
    encoder = FeatureEncoder(ds.spec).fit(ds)
    data = encode_dataset(ds, encoder)
    encode_s = time.perf_counter() - started - read_s
    model = build(name, encoder.fields, len(ds.spec.labels))
    result = fit(model, data, None, TrainConfig(epochs=epochs, batch_size=batch_size, progress=False, device="cpu"))
    total = time.perf_counter() - started
    rows = len(data) * epochs
    return {
        "train_rows": len(data),
        "epochs": epochs,
        "train_end_to_end_samples_per_s": rows / total,
        "train_loop_samples_per_s": float(np.mean([h["samples_per_s"] for h in result.history])),
        "train_seconds": total,
        "read_seconds": read_s,
        "encode_seconds": encode_s,
        "encoded_bytes_per_row": data.x.element_size() * data.x.shape[1] + data.y.element_size() * data.y.shape[1],
        "parameters": sum(p.numel() for p in model.parameters()),
    }, model, encoder


def time_prediction(model_dir: str, data_dir: str, repeats: int = 1) -> dict:
    best = float("inf")
    rows = 0
    for _ in range(repeats):
        started = time.perf_counter()
        loaded = load_model(model_dir)
        probs, dataset = loaded.predict_dataset(data_dir)
        best = min(best, time.perf_counter() - started)
        rows = len(probs)
    return {"predict_from_model_dir_samples_per_s": rows / best}


def time_in_memory_prediction(model: MultiTaskModel, encoder: FeatureEncoder, data_dir: str) -> dict:
    """Parquet on disk -> probabilities with the same steps for every model: read, encode, forward."""
    from apem.inference.predict import predict

    started = time.perf_counter()
    ds = read_dataset(data_dir)
    probs = predict(model.eval(), torch.from_numpy(encoder.transform(ds.table)))
    seconds = time.perf_counter() - started
    return {"predict_rows": len(probs), "predict_end_to_end_samples_per_s": len(probs) / seconds}


def throughput(args, root: str) -> dict:
    data = os.path.join(root, "synth")
    write_synthetic_dataset(SynthConfig(rows=args.rows, days=args.days, seed=0), data)
    splits = day_split(data, root, args.days)
    results: dict = {"rows": args.rows, "threads": torch.get_num_threads(), "models": {}}
    for name in ["plain_mlp", *args.models]:
        stats, model, encoder = time_training(name, splits["train"], args.epochs, args.batch_size)
        model_dir = save_model(os.path.join(root, f"model-{name}"), model, encoder, read_dataset(splits["val"]).spec,
                               extra_meta={"negative_rate": 1.0})
        stats.update(time_in_memory_prediction(model, encoder, data))
        if name != "plain_mlp":  # load_model rebuilds registry models; the reference lives in this script
            stats.update(time_prediction(model_dir, data))
        results["models"][name] = stats
    ref = results["models"]["plain_mlp"]
    for name in args.models:
        m = results["models"][name]
        m["train_time_ratio_vs_plain_mlp"] = ref["train_end_to_end_samples_per_s"] / m["train_end_to_end_samples_per_s"]
        m["train_loop_time_ratio_vs_plain_mlp"] = ref["train_loop_samples_per_s"] / m["train_loop_samples_per_s"]
        m["predict_time_ratio_vs_plain_mlp"] = ref["predict_end_to_end_samples_per_s"] / m["predict_end_to_end_samples_per_s"]
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bytes_per_row = results["models"]["plain_mlp"]["encoded_bytes_per_row"]
    results["encoded_gb_for_10m_rows"] = bytes_per_row * 10_000_000 / 1e9
    return results


def quality(args, root: str) -> dict:
    out: dict = {"rows": args.rows, "days": args.days, "runs": []}
    for seed in args.seeds:
        data = os.path.join(root, f"synth-{seed}")
        write_synthetic_dataset(SynthConfig(rows=args.rows, days=args.days, seed=seed), data)
        splits = day_split(data, os.path.join(root, f"split-{seed}"), args.days)
        train_ds, val_ds, test_ds = (read_dataset(splits[k]) for k in ("train", "val", "test"))
        encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
        train, val = encode_dataset(train_ds, encoder), encode_dataset(val_ds, encoder)
        oracle = read_oracle(data)
        test_ids = test_ds.table.column("impression_id")
        oracle = oracle.filter(pc.is_in(oracle.column("impression_id"), value_set=test_ids.combine_chunks()))
        order = pc.index_in(test_ids, value_set=oracle.column("impression_id").combine_chunks())
        labels = test_ds.labels()
        for name in args.models:
            torch.manual_seed(seed)
            model = build(name, encoder.fields, 3)
            started = time.perf_counter()
            result = fit(model, train, val, TrainConfig(epochs=args.epochs, seed=seed, progress=args.progress,
                                                        patience=args.patience, device="cpu"))
            seconds = time.perf_counter() - started
            model_dir = save_model(os.path.join(root, f"q-{name}-{seed}"), model, encoder, train_ds.spec)
            probs = load_model(model_dir).predict_table(test_ds.table) if name != "plain_mlp" else None
            if probs is None:
                from apem.inference.predict import predict
                probs = predict(model, torch.from_numpy(encoder.transform(test_ds.table)))
            tasks = {}
            for i, label in enumerate(train_ds.spec.labels):
                oracle_scores = oracle.column(f"p_{label}").to_numpy()[order.to_numpy()]
                model_auc, oracle_auc = auc(labels[:, i], probs[:, i]), auc(labels[:, i], oracle_scores)
                tasks[label] = {"auc": model_auc, "oracle_auc": oracle_auc,
                                "captured": (model_auc - 0.5) / (oracle_auc - 0.5), "positives": int(labels[:, i].sum())}
            out["runs"].append({"model": name, "seed": seed, "best_epoch": result.best_epoch,
                                "epochs_run": len(result.history), "train_seconds": seconds,
                                "train_rows": len(train), "test_rows": len(labels), "tasks": tasks})
            print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=["apem"])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep generated data here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (~10 s): not ours to time
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        results = quality(args, root) if args.quality else throughput(args, root)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
