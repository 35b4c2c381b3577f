"""Streaming training data against in-memory training data: samples/s and the trainer's peak memory.

Two figures of issue 14, each a ratio measured in one run on the same data:

1. **Training samples/s**, streaming / in-memory, same model (Shared-Bottom and APEM), same
   shards, same trainer loop (:func:`apem.train.trainer.fit`), over ``--steps`` mini-batches of one
   epoch (the cap is this benchmark's: a wrapper that ends the epoch early). The streaming side
   includes reading, encoding and the shuffle buffer (its first fill too); the in-memory side's
   one-off read + encode is reported apart as ``prepare_s``, as is the streaming fit pass. Goal >= 0.8.
2. **Peak RSS of a trainer process** (``VmHWM`` of ``/proc/self/status`` in a fresh subprocess
   running :func:`apem.train.from_dirs.load_training_data` and ``--memory-steps`` training steps) at
   N and 3N training rows, for both modes. Goal: streaming at 3N within 1.2x of streaming at N.
   (Not ``getrusage``: Linux keeps ``ru_maxrss`` across ``execve``, so a child started from a large
   parent reports the parent's peak; ``VmHWM`` belongs to the child's own address space.)

Data: ``--base-rows`` synthetic rows (``apem synth``'s generator, 14 days) written again and again,
each copy in its own row order, as Parquet shards of ``--shard-rows`` rows with row groups of
65,536 rows: so writing 30M rows never holds more than one copy in memory.

    nice -n 15 .venv/bin/python benchmarks/bench_streaming.py --rows 1000000 3000000

Measured (2 cores, 1 thread, 200 steps of Shared-Bottom after the data is prepared; the vocabulary
fit reads every row), ``--rows 10000000 30000000 --skip-speed``, 5 min 8 s:

| training rows | streaming peak | in-memory peak |
|---|---|---|
| 10M | 584 MB (fit pass 10.3 s) | 3,312 MB (read + encode 25.3 s) |
| 30M | 589 MB (fit pass 38.6 s) | 9,000 MB (read + encode 91.0 s) |
| 30M / 10M | **1.008x** (goal <= 1.2) | 2.72x |
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from apem.data.atomic import SUCCESS_MARKER
from apem.data.features import default_spec
from apem.models.registry import build_model
from apem.research.synth import SynthConfig, generate
from apem.train.from_dirs import load_training_data
from apem.train.trainer import TrainConfig, fit

ROW_GROUP_ROWS = 65_536
SMALL_APEM = {"inducing_points": 16, "layers": 2}


class FirstSteps:
    """Training data cut to its first ``steps`` batches per epoch (the benchmark's step cap)."""

    def __init__(self, data, steps: int, batch_size: int) -> None:
        self.data, self.steps = data, steps
        self.rows = min(len(data), steps * batch_size)

    def __len__(self) -> int:
        return self.rows

    def epoch_batches(self, epoch, batch_size, seed):
        return itertools.islice(self.data.epoch_batches(epoch, batch_size, seed), self.steps)

    def eval_batches(self):
        return self.data.eval_batches()

    def to_device(self, device):
        return FirstSteps(self.data.to_device(device), self.steps, self.rows // self.steps)

    def fingerprint(self) -> str:
        return self.data.fingerprint()


def write_rows(out: str, rows: int, base_rows: int, shard_rows: int, seed: int = 0) -> str:
    """A dataset directory of ``rows`` rows: copies of one synthetic table, each in its own order."""
    spec = default_spec()
    if os.path.exists(os.path.join(out, SUCCESS_MARKER)):
        return out
    os.makedirs(out, exist_ok=True)
    base, _ = generate(SynthConfig(rows=base_rows, days=14, seed=seed))
    rng = np.random.default_rng(seed)
    shard_rows = min(shard_rows, base_rows)
    for shard, begin in enumerate(range(0, rows, shard_rows)):
        take = rng.permutation(base.num_rows)[:min(shard_rows, rows - begin)]
        pq.write_table(base.take(take), os.path.join(out, f"part-{shard:05d}.parquet"), row_group_size=ROW_GROUP_ROWS)
    spec.write(out)
    open(os.path.join(out, SUCCESS_MARKER), "wb").close()
    return out


def prepared(train_dir: str, val_dir: str, mode: str, workers: int):
    started = time.perf_counter()
    config = TrainConfig(data_loading=mode, loader_workers=workers)
    encoder, train, val, chosen = load_training_data(train_dir, val_dir, config, "log_round")
    assert chosen == mode
    return encoder, train, time.perf_counter() - started


def reading_rate(train, steps: int, batch_size: int) -> float:
    """Rows/s of the data side alone (read + encode + shuffle for streaming, slicing for memory):
    the most a trainer can consume, e.g. on a GPU that trains faster than this."""
    started, rows = time.perf_counter(), 0
    for x, _ in itertools.islice(train.epoch_batches(0, batch_size, 0), steps):
        rows += x.shape[0]
    return rows / (time.perf_counter() - started)


def throughput(train_dir: str, val_dir: str, args) -> list[dict]:
    """samples/s of the trainer over ``args.steps`` batches, per model and mode, in this process."""
    torch.set_num_threads(args.threads)
    out = []
    sides = [("memory", 0)] + [("streaming", w) for w in args.workers]
    data = {side: prepared(train_dir, val_dir, *side) for side in sides}
    for side, (_, train, _) in data.items():
        out.append({"model": "(data only)", "mode": side[0], "workers": side[1],
                    "samples_per_s": reading_rate(train, args.steps, args.batch_size)})
        print(json.dumps(out[-1]), flush=True)
    for model_name in args.models:
        warm_up = build_model(model_name, data[sides[0]][0].fields, 3, SMALL_APEM if model_name == "apem" else None)
        fit(warm_up, FirstSteps(data[sides[0]][1], 20, args.batch_size), None,  # first-call costs (imports) out
            TrainConfig(epochs=1, batch_size=args.batch_size, progress=False))
        for repeat in range(args.repeats):
            for side in sides:
                encoder, train, prepare_s = data[side]
                torch.manual_seed(0)
                model = build_model(model_name, encoder.fields, 3, SMALL_APEM if model_name == "apem" else None)
                config = TrainConfig(epochs=1, batch_size=args.batch_size, progress=False, seed=repeat)
                record = fit(model, FirstSteps(train, args.steps, args.batch_size), None, config).history[0]
                out.append({"model": model_name, "mode": side[0], "workers": side[1], "repeat": repeat,
                            "samples_per_s": record["samples_per_s"], "rows": record["rows"],
                            "prepare_s": round(prepare_s, 2)})
                print(json.dumps(out[-1]), flush=True)
    return out


def child_peak(train_dir: str, val_dir: str, mode: str, steps: int, threads: int) -> None:
    """Run in a fresh process: prepare the data, train ``steps`` batches, print the peak RSS."""
    torch.set_num_threads(threads)
    encoder, train, prepare_s = prepared(train_dir, val_dir, mode, 0)
    model = build_model("shared_bottom", encoder.fields, 3)
    fit(model, FirstSteps(train, steps, 1024), None, TrainConfig(epochs=1, progress=False))
    with open("/proc/self/status") as fh:
        peak_mb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024  # kB
    print(json.dumps({"mode": mode, "rows": len(train),
                      "peak_rss_mb": round(peak_mb, 1), "prepare_s": round(prepare_s, 2)}))


def peak_memory(dirs: dict[int, str], val_dir: str, args) -> list[dict]:
    out = []
    for rows, train_dir in dirs.items():
        for mode in ("memory", "streaming"):
            cmd = [sys.executable, __file__, "--child", mode, train_dir, val_dir, str(args.memory_steps)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out.append({"train_rows": rows, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(json.dumps(out[-1]), flush=True)
    return out


def summarise(speed: list[dict], memory: list[dict], rows: list[int]) -> dict:
    table = {}
    for model in sorted({r["model"] for r in speed}):
        best = {}
        for r in speed:
            if r["model"] == model:
                key = r["mode"] if r["mode"] == "memory" else f"streaming_w{r['workers']}"
                best[key] = max(best.get(key, 0.0), r["samples_per_s"])
        table[model] = {**{k: round(v) for k, v in best.items()},
                        **{f"ratio_{k}": round(v / best["memory"], 3) for k, v in best.items() if k != "memory"}}
    peaks = {(r["mode"], r["train_rows"]): r["peak_rss_mb"] for r in memory}
    small, large = min(rows), max(rows)
    growth = {mode: round(peaks[(mode, large)] / peaks[(mode, small)], 3) for mode in ("memory", "streaming")
              if (mode, small) in peaks and (mode, large) in peaks}
    return {"samples_per_s": table, "peak_rss_mb": {f"{m}@{n}": v for (m, n), v in peaks.items()},
            f"peak_growth_{large}_over_{small}": growth}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_peak(sys.argv[3], sys.argv[4], sys.argv[2], int(sys.argv[5]), 1)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[1_000_000, 3_000_000], metavar=("N", "3N"))
    parser.add_argument("--base-rows", type=int, default=250_000)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--models", nargs="+", default=["shared_bottom", "apem"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="streaming loader workers to measure")
    parser.add_argument("--steps", type=int, default=250, help="training batches per throughput measurement")
    parser.add_argument("--memory-steps", type=int, default=200, help="training batches in each peak-memory child")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="best of N per side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "apem-bench-streaming"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    val_dir = write_rows(os.path.join(args.workdir, "val"), 50_000, 50_000, 50_000, seed=99)
    dirs = {n: write_rows(os.path.join(args.workdir, f"train-{n}"), n, args.base_rows, args.shard_rows)
            for n in args.rows}
    print(f"data ready in {time.perf_counter() - started:.0f} s", flush=True)
    speed = [] if args.skip_speed else throughput(dirs[min(args.rows)], val_dir, args)
    memory = [] if args.skip_memory else peak_memory(dirs, val_dir, args)
    print(json.dumps({"summary": summarise(speed, memory, args.rows), "threads": args.threads,
                      "batch_size": args.batch_size, "steps": args.steps,
                      "seconds": round(time.perf_counter() - started)}, indent=2))


if __name__ == "__main__":
    main()
