"""Issue 9's GPU check: APEM and Shared-Bottom, one epoch each on a GPU, bf16 autocast, a large batch.

    .venv/bin/python benchmarks/bench_gpu.py [--rows 2000000] [--batch-size 16384] [--precision bf16]
        [--sweep [--sweep-compile]] [--profile-steps 10] [--out DIR] [--budget-s 240]
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --rows 40000 --batch-size 1024 --sweep --profile-steps 3

Generates ``--rows`` synthetic impressions (``apem synth``'s financial funnel, 30 days, seed 0),
splits them by day (80/10/10), fits the features on train, then for each model: one warm-up
epoch on the first 64k rows (CUDA kernels and allocator), one timed epoch over the whole training
split, and the test AUC per task of the model after that epoch. Prints samples/s for both, their
ratio, the peak GPU memory of each model's timed epoch, and the AUCs, as JSON and as a table.
Then, because a GPU machine is lent for minutes at a time and each finding should come from one run:
the trained APEM's predictions on the device against the CPU's in float32 (the reference path);
with ``--sweep``, APEM again at other settings (batch sizes, float32, the direct path without the
distinct-row gather, and with ``--sweep-compile`` a forward through ``torch.compile``, whose compile time
the warm-up's seconds show), each a fresh model; with ``--profile-steps``, the torch profiler over that
many APEM training steps (device-busy share of the wall time, kernel launches and host waits per
step, the top kernels) and the Python lines that made the host wait for the device in one step.
Anything past ``--budget-s`` seconds is skipped and reported as skipped.
Goal (issue 9): APEM >= 600k training samples/s on one H200 (an Ali-CCP-size epoch of 38M
samples in <= 60 s). ``benchmarks/gpu_check.sh`` installs the environment and runs this.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import day_split  # noqa: E402

from apem.data.encoding import FeatureEncoder  # noqa: E402
from apem.data.spec import read_dataset  # noqa: E402
from apem.eval.metrics import auc  # noqa: E402
from apem.inference.predict import predict  # noqa: E402
from apem.models.registry import build_model, list_models  # noqa: E402
from apem.research.synth import SynthConfig, write_synthetic_dataset  # noqa: E402
from apem.train.trainer import EncodedData, TrainConfig, encode_dataset, fit  # noqa: E402

GOAL_APEM_SAMPLES_PER_S = 600_000
BATCH_SIZE, PRECISION = 16384, "bf16"  # the check's setting (bench_speed_table.py's GPU row takes it too)
WARM_UP_ROWS = 65536


def prepare(rows: int, root: str) -> tuple[EncodedData, EncodedData, list, int]:
    data = os.path.join(root, "synth")
    write_synthetic_dataset(SynthConfig(rows=rows, days=30, seed=0), data)
    splits = day_split(data, os.path.join(root, "split"), 30)
    train_ds, test_ds = read_dataset(splits["train"]), read_dataset(splits["test"])
    encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
    train, test = encode_dataset(train_ds, encoder), encode_dataset(test_ds, encoder)
    return train, test, encoder.fields, train.y.shape[1]


def prepared_on_device(rows: int, device: torch.device) -> tuple[EncodedData, EncodedData, list, int]:
    """:func:`prepare` in a temporary folder, the encoded splits moved to ``device`` before any clock starts
    (fit() would otherwise copy them there again for every timed epoch)."""
    with tempfile.TemporaryDirectory() as root:
        train, test, fields, n_tasks = prepare(rows, root)
    return train.to_device(device), test.to_device(device), fields, n_tasks


@contextlib.contextmanager
def float32_matmul_precision(level: str):
    """torch's float32 matmul precision set to ``level`` inside, restored after. The check runs under "high":
    APEM's hand-written poolings run in float32 outside autocast, and so may use TF32 tensor cores."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_config(args, batch_size: int | None = None, precision: str | None = None) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch_size or args.batch_size, seed=0, device=args.device,
                       progress=False, precision=precision or args.precision)


def measure(name: str, train: EncodedData, test: EncodedData, fields, n_tasks: int, args,
            overrides: dict | None = None, batch_size: int | None = None, precision: str | None = None,
            compiled: bool = False) -> dict:
    """A fresh model: a warm-up epoch on the first rows, one timed epoch over ``train``, the test AUCs.
    ``compiled``: the model's forward through ``torch.compile`` (compiled during the warm-up, which is timed)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(name, fields, n_tasks, overrides)
    if compiled:
        model.forward = torch.compile(model.forward)
    config = train_config(args, batch_size, precision)
    started = time.perf_counter()
    fit(model, EncodedData(train.x[:WARM_UP_ROWS], train.y[:WARM_UP_ROWS]), None, config)  # kernels, allocator
    warm_up_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    fit(model, train, None, config)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    probs = predict(model.eval(), test.x, batch_size=65536, device=device)
    labels = test.y.cpu().numpy()
    return {"samples_per_s": len(train) / seconds, "epoch_seconds": seconds, "warm_up_seconds": warm_up_s,
            "batch_size": config.batch_size, "precision": config.precision, "overrides": overrides or {},
            "peak_gpu_memory_gib": peak / 2 ** 30 if peak is not None else None,
            "test_auc": [auc(labels[:, i], probs[:, i]) for i in range(labels.shape[1])], "model": model}


def guarded(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or {"error": ...} with the traceback printed: one failing stage on a lent GPU
    machine must not lose the stages measured before and after it."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        traceback.print_exc()
        return {"error": f"{what}: {type(error).__name__}: {error}"}


def preflight(train: EncodedData, fields, n_tasks: int, args) -> dict[str, str]:
    """Every registered model trains two steps and predicts on the device: "ok" or the error, per model."""
    rows = 2 * min(args.batch_size, 4096)
    subset = EncodedData(train.x[:rows], train.y[:rows])
    results = {}
    for name in list_models():
        def run_one():
            model = build_model(name, fields, n_tasks)
            fit(model, subset, None, train_config(args, batch_size=rows // 2))
            probs = predict(model, subset.x, batch_size=rows, device=torch.device(args.device))
            return "ok" if np.isfinite(probs).all() and probs.shape == (rows, n_tasks) else "non-finite or misshapen"
        results[name] = guarded(f"preflight {name}", run_one)
    return results


def device_agreement(model, test: EncodedData, device: torch.device, rows: int = 4096) -> dict:
    """Max |p_device - p_cpu| of the trained model's float32 predictions on ``rows`` test rows, TF32 off:
    the CPU path (the C kernels or torch ops) is the reference the device path must match."""
    x = test.x[:rows].cpu()
    with float32_matmul_precision("highest"):
        on_device = predict(model, x, batch_size=rows, device=device)
        on_cpu = predict(copy.deepcopy(model).cpu(), x, batch_size=rows, device="cpu")
    return {"rows": int(x.shape[0]), "max_abs_diff": float(np.abs(on_device - on_cpu).max())}


def sweep_settings(args) -> list[tuple[str, dict]]:
    """APEM variants timed after the two models: (label, measure() keyword arguments)."""
    sizes = [int(b) for b in args.sweep_batch_sizes.split(",") if b and int(b) != args.batch_size]
    other = "fp32" if args.precision == "bf16" else "bf16"
    return ([(f"batch {b}", {"batch_size": b}) for b in sizes]
            + [(other, {"precision": other}), ("direct path (gather_fields=False)", {"overrides": {"gather_fields": False}})]
            # float32: under bf16 autocast inductor fails on the hand-written backwards (a bf16 product beside
            # float32 buffers: the autocast-free region of float32_outside_autocast is not kept in the graph)
            + ([("torch.compile of the forward, fp32", {"compiled": True, "precision": "fp32"})]
               if args.sweep_compile else []))


def host_waits(model, train: EncodedData, args) -> dict[str, int]:
    """The Python lines (file:line) whose ops made the host wait for the device during one training epoch
    of two batches, from CUDA's sync debug mode; empty where nothing waited (or not on CUDA)."""
    if not args.device.startswith("cuda"):
        return {}
    rows = 2 * args.batch_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, EncodedData(train.x[:rows], train.y[:rows]), None, train_config(args))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.relpath(w.filename)}:{w.lineno}"
            waits[where] = waits.get(where, 0) + 1
    return waits


def _device_time_us(event) -> float:
    # the attribute was renamed from cuda to device across torch versions
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_steps(model, train: EncodedData, args) -> tuple[dict, str]:
    """torch.profiler over ``args.profile_steps`` training steps of ``model``: per step, the wall time, the
    device-busy time, the kernel launches and the host waits; and the profiler's table of the top ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    rows = args.profile_steps * args.batch_size
    subset = EncodedData(train.x[:rows], train.y[:rows])
    fit(model, subset, None, train_config(args))  # warm at this batch size
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fit(model, subset, None, train_config(args))
        synchronize(device)
    wall_us = (time.perf_counter() - started) * 1e6
    averages = prof.key_averages()
    counts = {name: sum(e.count for e in averages if e.key == name)
              for name in ("cudaLaunchKernel", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")}
    # the kernels' own events (a CPU op's device time repeats its kernels')
    busy_us = sum(_device_time_us(e) for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA)
    steps = args.profile_steps
    summary = {"steps": steps, "batch_size": args.batch_size, "wall_ms_per_step": wall_us / steps / 1e3,
               "device_busy_ms_per_step": busy_us / steps / 1e3, "device_busy_share": busy_us / wall_us,
               **{f"{k}_per_step": v / steps for k, v in counts.items()}}
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return summary, averages.table(sort_by=sort_key, row_limit=30)


def run_extras(best_apem, train, test, fields, n_tasks, args, started: float) -> tuple[dict, str]:
    """The agreement check, the sweep and the profile, each skipped once ``args.budget_s`` has passed."""
    device = torch.device(args.device)
    extras: dict = {"skipped": []}
    table = ""

    def within_budget(what: str) -> bool:
        if time.perf_counter() - started <= args.budget_s:
            return True
        extras["skipped"].append(what)
        return False

    if device.type == "cuda" and best_apem is not None:
        extras["agreement_cuda_vs_cpu_fp32"] = guarded("agreement", device_agreement, best_apem, test, device)
    if args.sweep:
        extras["sweep"] = {}
        for label, kwargs in sweep_settings(args):
            if within_budget(f"sweep: {label}"):
                result = guarded(f"sweep {label}", measure, "apem", train, test, fields, n_tasks, args, **kwargs)
                result.pop("model", None)
                extras["sweep"][label] = result
    if args.profile_steps and best_apem is not None and within_budget("profile"):
        extras["host_waits_in_one_epoch_of_two_steps"] = guarded("host waits", host_waits, best_apem, train, args)
        profiled = guarded("profile", profile_steps, best_apem, train, args)
        if isinstance(profiled, dict):
            extras["profile"] = profiled
        else:
            extras["profile"], table = profiled
    return extras, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=PRECISION)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sweep", action="store_true", help="also time APEM at other settings")
    parser.add_argument("--sweep-batch-sizes", default="4096,65536,262144")
    parser.add_argument("--sweep-compile", action="store_true", help="the sweep also times a torch.compile'd forward")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many APEM training steps")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip the extras that start after this")
    parser.add_argument("--preflight", action="store_true", help="first train every model two steps on the device")
    parser.add_argument("--out", help="also write report.json (and profile.txt) into this new or empty folder")
    args = parser.parse_args()
    if args.out and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        # what is there is not this run's: never written over
        print(f"bench_gpu: --out {args.out} must be a new or empty folder", file=sys.stderr)
        sys.exit(2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # `make bench` runs every benchmark; on a machine without a GPU this one has nothing to measure
        print(json.dumps({"skipped": f"no CUDA device visible to torch {torch.__version__}"}))
        return
    started = time.perf_counter()
    torch.set_float32_matmul_precision("high")  # see float32_matmul_precision
    device = torch.device(args.device)
    train, test, fields, n_tasks = prepared_on_device(args.rows, device)
    prepare_s = time.perf_counter() - started
    checks = preflight(train, fields, n_tasks, args) if args.preflight else {}
    print(json.dumps({"prepare_seconds": prepare_s, "preflight": checks}), flush=True)
    results = {name: guarded(name, measure, name, train, test, fields, n_tasks, args)
               for name in ("apem", "shared_bottom")}
    apem_model = results["apem"].pop("model", None)
    results["shared_bottom"].pop("model", None)
    print(json.dumps(results), flush=True)
    extras, table = run_extras(apem_model, train, test, fields, n_tasks, args, started)
    apem, sb = results["apem"], results["shared_bottom"]
    ratio = sb["samples_per_s"] / apem["samples_per_s"] if "error" not in apem and "error" not in sb else None
    report = {"rows": args.rows, "train_rows": len(train), "batch_size": args.batch_size, "precision": args.precision,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else args.device,
              "torch": torch.__version__, "python": sys.version.split()[0], "prepare_seconds": prepare_s,
              "preflight": checks, "models": results, "apem_over_shared_bottom_time": ratio, **extras,
              "total_seconds": time.perf_counter() - started}
    print(json.dumps(report, indent=2))
    if table:
        print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if table:
            with open(os.path.join(args.out, "profile.txt"), "w") as f:
                f.write(table)
    if ratio is None:
        sys.exit(1)
    print(f"APEM {apem['samples_per_s']:,.0f} samples/s (goal >= {GOAL_APEM_SAMPLES_PER_S:,}), "
          f"Shared-Bottom {sb['samples_per_s']:,.0f}; time ratio APEM/SB {ratio:.2f}; "
          f"peak memory {apem['peak_gpu_memory_gib']} / {sb['peak_gpu_memory_gib']} GiB; "
          f"test AUC APEM {np.round(apem['test_auc'], 4).tolist()} SB {np.round(sb['test_auc'], 4).tolist()}")


if __name__ == "__main__":
    main()
