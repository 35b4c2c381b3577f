"""Issue 9's GPU check: APEM and Shared-Bottom, one epoch each on a GPU, bf16 autocast, a large batch.

    .venv/bin/python benchmarks/bench_gpu.py [--rows 2000000] [--batch-size 16384] [--precision bf16]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --rows 40000 --batch-size 1024   # a smoke run

Generates ``--rows`` synthetic impressions (``apem synth``'s financial funnel, 30 days, seed 0),
splits them by day (80/10/10), fits the features on train, then for each model: one warm-up
epoch on the first 64k rows (CUDA kernels and allocator), one timed epoch over the whole training
split, and the test AUC per task of the model after that epoch. Prints samples/s for both, their
ratio, the peak GPU memory of each model's timed epoch, and the AUCs, as JSON and as a table.
Goal (issue 9): APEM >= 600k training samples/s on one H200 (an Ali-CCP-size epoch of 38M
samples in <= 60 s). ``benchmarks/gpu_check.sh`` installs the environment and runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import day_split  # noqa: E402

from apem.data.encoding import FeatureEncoder  # noqa: E402
from apem.data.spec import read_dataset  # noqa: E402
from apem.eval.metrics import auc  # noqa: E402
from apem.inference.predict import predict  # noqa: E402
from apem.models.registry import build_model  # noqa: E402
from apem.research.synth import SynthConfig, write_synthetic_dataset  # noqa: E402
from apem.train.trainer import EncodedData, TrainConfig, encode_dataset, fit  # noqa: E402

GOAL_APEM_SAMPLES_PER_S = 600_000


def prepare(rows: int, root: str) -> tuple[EncodedData, EncodedData, list, int]:
    data = os.path.join(root, "synth")
    write_synthetic_dataset(SynthConfig(rows=rows, days=30, seed=0), data)
    splits = day_split(data, os.path.join(root, "split"), 30)
    train_ds, test_ds = read_dataset(splits["train"]), read_dataset(splits["test"])
    encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
    train, test = encode_dataset(train_ds, encoder), encode_dataset(test_ds, encoder)
    return train, test, encoder.fields, train.y.shape[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, train: EncodedData, test: EncodedData, fields, n_tasks: int, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(name, fields, n_tasks)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, device=args.device, progress=False,
                         precision=args.precision)
    fit(model, EncodedData(train.x[:65536], train.y[:65536]), None, config)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    fit(model, train, None, config)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    probs = predict(model.eval(), test.x, batch_size=65536, device=device)
    labels = test.y.numpy()
    return {"samples_per_s": len(train) / seconds, "epoch_seconds": seconds,
            "peak_gpu_memory_gib": peak / 2 ** 30 if peak is not None else None,
            "test_auc": [auc(labels[:, i], probs[:, i]) for i in range(labels.shape[1])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # `make bench` runs every benchmark; on a machine without a GPU this one has nothing to measure
        print(json.dumps({"skipped": f"no CUDA device visible to torch {torch.__version__}"}))
        return
    # APEM's hand-written poolings run in float32 outside autocast: let them use TF32 tensor cores
    torch.set_float32_matmul_precision("high")
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        train, test, fields, n_tasks = prepare(args.rows, root)
        prepare_s = time.perf_counter() - started
        results = {name: measure(name, train, test, fields, n_tasks, args) for name in ("apem", "shared_bottom")}
    ratio = results["shared_bottom"]["samples_per_s"] / results["apem"]["samples_per_s"]
    report = {"rows": args.rows, "train_rows": len(train), "batch_size": args.batch_size, "precision": args.precision,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "prepare_seconds": prepare_s, "models": results, "apem_over_shared_bottom_time": ratio}
    print(json.dumps(report, indent=2))
    apem, sb = results["apem"], results["shared_bottom"]
    print(f"APEM {apem['samples_per_s']:,.0f} samples/s (goal >= {GOAL_APEM_SAMPLES_PER_S:,}), "
          f"Shared-Bottom {sb['samples_per_s']:,.0f}; time ratio APEM/SB {ratio:.2f}; "
          f"peak memory {apem['peak_gpu_memory_gib']} / {sb['peak_gpu_memory_gib']} GiB; "
          f"test AUC APEM {np.round(apem['test_auc'], 4).tolist()} SB {np.round(sb['test_auc'], 4).tolist()}")


if __name__ == "__main__":
    main()
