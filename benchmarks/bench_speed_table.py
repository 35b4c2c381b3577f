"""Issue 9's table in one run: APEM against Shared-Bottom and PLE, side by side, same data, same threads.

    .venv/bin/python benchmarks/bench_speed_table.py [--rows 100000] [--threads 2] [--auc-seeds 0 1]

Rows printed (goal in brackets):

- train time APEM / Shared-Bottom (<= 4.0, stretch 2) and APEM / PLE (<= 1.0): seconds of
  ``apem.train.trainer.fit`` over the same pre-encoded rows (batch ``--batch-size``, Table 2 sizes);
- predict time APEM / Shared-Bottom end to end (<= 2.0, stretch 1.34) and APEM's end-to-end rows/s
  (>= 100k): saved model directory + Parquet on disk -> recalibrated predictions (load, read,
  encode, forward, recalibrate); ``--predict-rounds`` passes of every model, the ratios over their sums (with the
  range of the per-round ratios) and the rows/s of the fastest pass;
- test AUC (mean over tasks) of APEM's reference path against the fast paths, trained on the same
  day split with the same seeds (``--auc-seeds``; 2 epochs, early stopping) (unchanged within noise);
- APEM training samples/s on a GPU (>= 600k/s), only when CUDA is available: ``bench_gpu.py``'s measurement
  (``--gpu-rows`` synthetic rows, bf16 autocast, batch 16384);
- context, no goal: the latency of one served request of 1 and of 100 rows, APEM / Shared-Bottom, through what
  the registered MLflow model runs per request (:meth:`apem.inference.model_dir.LoadedModel.predict_frame`:
  pandas -> Arrow -> encode -> predict -> recalibrate), on one thread as each serving worker has;
- context, no goal: matrix-product FLOPs per row of APEM and PLE against Shared-Bottom, for a training
  step and for predict (:func:`matmul_flops_per_row`, on the models as built, before training, so every
  inducing point is in use): a time ratio far above its FLOP ratio is spent outside the matrix products.

Variants: ``apem`` (the default config: planned gamma, at its floor after training, so z is binary; on
CPU predict runs eq. 13-19 through one fused C kernel per layer over the points some row of a batch keeps,
:func:`apem.nn.native_pools.fused_predict`), ``apem_fixed_rate`` (fixed-rate gamma, so z is still soft after
these short runs: predict takes the general path), ``apem_nothing`` (with
``deselected_point="contributes_nothing"``), ``apem_reference`` (the path before issue 9: fixed-rate
gamma, no predict-time tables), ``apem_direct`` (training only: the ASRG products over every field
row, ``gather_fields=False``, as before the distinct-rows path), ``apem_every_point`` (training only: the
default APEM over all K points of every layer, as before training skipped the points no row of a batch keeps,
:meth:`apem.models.apem_model.APEM.kept_pattern_pool`), ``apem_two_kernels`` (training only: every point, through
the ASRG kernel and then eq. 18's kernel in turn, as before one kernel ran both per sample,
:func:`apem.nn.native_pools.pattern_pool`), ``apem_torch_pools`` (training only: the default APEM
with its attention poolings through torch instead of the C kernels of
:mod:`apem.nn.native_pools`; ``apem_reference`` and ``apem_direct`` run through torch too) and, for predict only,
``apem_unfused`` (the trained default APEM through the ASRG kernel and then eq. 18's kernel over all K
points, predict as it was before the fused kernel, :mod:`unfused_apem`), ``apem_tables`` (the trained
default APEM through :class:`FoldedAPEM`'s lookup tables, which predict takes where the C kernels do not
run), ``apem_previous_tables`` and ``apem_fixed_rate_previous_tables`` (the same trained models through
the lookup tables as they were before their fused path, :mod:`previous_folded_apem`) and
``apem_all_points`` and ``apem_nothing_all_points`` (the same trained models through the tables' fused
path as it was before it skipped the points no row of a chunk selects, :mod:`all_points_folded_apem`).
The machine may be shared, so training is interleaved: the rows are cut
into ``--rounds`` chunks and each round trains every model on the next chunk, in alternating order, with APEM,
Shared-Bottom and PLE back to back; the training ratios give the range of their per-round values beside the total.
Predict is interleaved the same way, APEM and Shared-Bottom back to back in each round (the machine's speed moved
Shared-Bottom's best pass by 15% between whole runs, minutes apart).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402
from all_points_folded_apem import AllPointsFoldedAPEM  # noqa: E402
from bench_model import day_split  # noqa: E402
from previous_folded_apem import PreviousFoldedAPEM  # noqa: E402
from unfused_apem import UnfusedAPEM  # noqa: E402

from apem.data.encoding import FeatureEncoder  # noqa: E402
from apem.data.spec import read_dataset  # noqa: E402
from apem.eval.metrics import auc  # noqa: E402
from apem.inference.model_dir import feature_frame, load_model, save_model  # noqa: E402
from apem.models.apem_folded import FoldedAPEM  # noqa: E402
from apem.models.registry import build_model  # noqa: E402
from apem.nn import attention  # noqa: E402
from apem.nn.native import DISABLE_ENV  # noqa: E402
from apem.research.synth import SynthConfig, write_synthetic_dataset  # noqa: E402
from apem.train.malloc_tuning import keep_freed_memory_for_reuse  # noqa: E402
from apem.train.trainer import EncodedData, TrainConfig, encode_dataset, fit  # noqa: E402

VARIANTS = {"apem": ("apem", {}), "apem_fixed_rate": ("apem", {"gamma_schedule": "fixed_rate"}),
            "apem_nothing": ("apem", {"deselected_point": "contributes_nothing", "gamma_schedule": "planned"}),
            "apem_reference": ("apem", {"gamma_schedule": "fixed_rate"}),
            "apem_direct": ("apem", {"gather_fields": False}),
            "apem_torch_pools": ("apem", {}), "apem_every_point": ("apem", {}), "apem_two_kernels": ("apem", {}),
            "shared_bottom": ("shared_bottom", {}), "ple": ("ple", {})}
# variants that run their attention poolings through torch, not the C kernels (apem.nn.native_pools):
# the paths before them, and the default APEM with only the kernels taken away
TORCH_POOLS = {"apem_reference", "apem_direct", "apem_torch_pools"}


@contextlib.contextmanager
def pools_of(variant: str):
    """Within: ``variant``'s attention poolings (the torch path for :data:`TORCH_POOLS`, else the kernels), and for
    ``apem_every_point`` every point kept by the batch (training then computes all K of every layer)."""
    previous, kept_by_batch = os.environ.get(DISABLE_ENV), attention.kept_by_batch
    os.environ[DISABLE_ENV] = "0" if variant in TORCH_POOLS else "1"
    if variant == "apem_every_point":
        attention.kept_by_batch = lambda logits, gamma: torch.ones(logits.shape[1:], dtype=torch.bool)
    try:
        yield
    finally:
        attention.kept_by_batch = kept_by_batch
        if previous is None:
            del os.environ[DISABLE_ENV]
        else:
            os.environ[DISABLE_ENV] = previous


def as_reference(model):
    """APEM on the path before issue 9: no predict-time tables (and, in VARIANTS, the fixed-rate gamma)."""
    model.inference_module = lambda rows=None: model
    return model


def build(variant: str, fields, n_tasks: int, seed: int = 0):
    torch.manual_seed(seed)
    name, overrides = VARIANTS[variant]
    model = build_model(name, fields, n_tasks, overrides)
    if variant == "apem_two_kernels":  # training through the two kernels in turn, every point (the path after it)
        model.kept_pattern_pool = lambda rows, index, logits: None
    return as_reference(model) if variant == "apem_reference" else model


GOAL_MODELS = ("apem", "shared_bottom", "ple")  # the goal ratios' models: timed back to back within each round


def time_training(models: dict, data: EncodedData, args) -> dict[str, list[float]]:
    """Seconds of one epoch per round and model: round r trains every model on the r-th chunk of the rows, in
    alternating order, with :data:`GOAL_MODELS` next to each other (a burst of the machine's other load then
    falls on all three or on none, where a dozen other models between them would leave seconds for it)."""
    config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, device="cpu", progress=False)
    warmup = EncodedData(x=data.x[: 3 * args.batch_size], y=data.y[: 3 * args.batch_size])
    for name, model in models.items():
        with pools_of(name):
            fit(model, warmup, None, config)
    names = [*GOAL_MODELS, *(name for name in models if name not in GOAL_MODELS)]
    seconds, chunk = {name: [] for name in names}, -(-len(data) // args.rounds)
    for r in range(args.rounds):
        part = EncodedData(x=data.x[r * chunk:(r + 1) * chunk], y=data.y[r * chunk:(r + 1) * chunk])
        for name in (names if r % 2 == 0 else names[::-1]):
            with pools_of(name):
                started = time.perf_counter()
                fit(models[name], part, None, config)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def time_ratio(rounds: dict[str, list[float]], variant: str, reference: str) -> str:
    """``variant``'s time over ``reference``'s, summed over the rounds (of training or predict), and the range of
    the per-round ratios (how much the machine moved it)."""
    per_round = [a / b for a, b in zip(rounds[variant], rounds[reference])]
    total = sum(rounds[variant]) / sum(rounds[reference])
    return f"{total:.2f} (per round {min(per_round):.2f}-{max(per_round):.2f})"


PREVIOUS_TABLES = "_previous_tables"  # suffix of a predict-only variant: the trained model, the tables before
ALL_POINTS = "_all_points"  # suffix of a predict-only variant: the trained model, every point of every chunk
TABLES = "apem_tables"  # predict-only: the trained default APEM through today's lookup tables, not the C kernels
UNFUSED = "apem_unfused"  # predict-only: the trained default APEM through the two pooling kernels in turn (before)


def model_dir(root: str, name: str) -> str:
    """Where :func:`time_predict` saves model ``name`` (and :func:`time_requests` loads it)."""
    return os.path.join(root, f"model-{name}")


PREDICT_GOAL_MODELS = ("apem", "shared_bottom")  # timed back to back within each predict round


def time_predict(models: dict, encoder, spec, data_dir: str, root: str, args) -> dict[str, list[float]]:
    """Seconds of one end-to-end predict per round and model, in alternating order, with
    :data:`PREDICT_GOAL_MODELS` next to each other."""
    dirs = {name: save_model(model_dir(root, name), model.eval(), encoder, spec)
            for name, model in models.items()}
    dirs.update({name + PREVIOUS_TABLES: dirs[name] for name in ("apem", "apem_fixed_rate")})
    dirs.update({name + ALL_POINTS: dirs[name] for name in ("apem", "apem_nothing")})
    dirs[TABLES] = dirs[UNFUSED] = dirs["apem"]
    names = [*PREDICT_GOAL_MODELS, *(name for name in dirs if name not in PREDICT_GOAL_MODELS)]
    for name in names:  # untimed: what a process does once per model (loading, first calls) is not a round's
        with pools_of(name):
            _predict_once(dirs[name], name, data_dir, args)
    seconds = {name: [] for name in names}
    for r in range(args.predict_rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with pools_of(name):
                started = time.perf_counter()
                _predict_once(dirs[name], name, data_dir, args)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def _predict_once(model_dir: str, name: str, data_dir: str, args) -> None:
    loaded = load_model(model_dir)
    if name == "apem_reference":
        as_reference(loaded.model)
    if name.endswith(PREVIOUS_TABLES):
        loaded.model.inference_module = lambda rows=None, m=loaded.model: PreviousFoldedAPEM(m)
    if name.endswith(ALL_POINTS):
        loaded.model.inference_module = lambda rows=None, m=loaded.model: AllPointsFoldedAPEM(m)
    if name == TABLES:
        loaded.model.inference_module = lambda rows=None, m=loaded.model: FoldedAPEM(m)
    if name == UNFUSED:
        loaded.model.inference_module = lambda rows=None, m=loaded.model: UnfusedAPEM(m)
    loaded.predict_table(read_dataset(data_dir).table, batch_size=args.predict_batch_size)


REQUEST_ROWS = (1, 100)


def time_requests(root: str, data_dir: str, args) -> dict[str, dict[int, float]]:
    """Median milliseconds of one served request of n rows (:data:`REQUEST_ROWS`) for the models :func:`time_predict`
    saved, alternating between them, on one thread (infra/base/serving.yaml gives each worker one)."""
    table, threads = read_dataset(data_dir).table, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = {name: load_model(model_dir(root, name)) for name in ("shared_bottom", "apem")}
        for model in loaded.values():
            model.warm_up()
        samples = {name: {rows: [] for rows in REQUEST_ROWS} for name in loaded}
        for rows in REQUEST_ROWS:
            frame = feature_frame(table, loaded["apem"].spec.features, rows)
            for repeat in range(args.request_repeats):
                for name in (list(loaded) if repeat % 2 == 0 else list(loaded)[::-1]):
                    started = time.perf_counter()
                    loaded[name].predict_frame(frame)
                    samples[name][rows].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return {name: {rows: float(np.median(t)) * 1e3 for rows, t in by_rows.items()} for name, by_rows in samples.items()}


def request_rows(request_ms: dict[str, dict[int, float]]) -> list[tuple[str, str, str]]:
    return [(f"served request of {rows} row{'s' if rows > 1 else ''}: APEM / Shared-Bottom latency",
             f"{request_ms['apem'][rows] / request_ms['shared_bottom'][rows]:.2f} "
             f"({request_ms['apem'][rows]:.1f} vs {request_ms['shared_bottom'][rows]:.1f} ms)",
             "(context: the paper's inference ratio is 1.34)") for rows in REQUEST_ROWS]


def auc_check(root: str, args) -> dict[str, list[float]]:
    """Test AUC (mean over tasks) per seed of each APEM variant, trained on the same day split."""
    data = os.path.join(root, "auc")
    write_synthetic_dataset(SynthConfig(rows=args.auc_rows, days=30, seed=0), data)
    splits = day_split(data, os.path.join(root, "auc-split"), 30)
    train_ds, val_ds, test_ds = (read_dataset(splits[k]) for k in ("train", "val", "test"))
    encoder = FeatureEncoder(train_ds.spec).fit(train_ds)
    train, val = encode_dataset(train_ds, encoder), encode_dataset(val_ds, encoder)
    test = encode_dataset(test_ds, encoder)
    out: dict[str, list[float]] = {}
    for variant in ("apem_reference", "apem", "apem_torch_pools", "apem_nothing", "apem_direct"):
        for seed in args.auc_seeds:
            model = build(variant, encoder.fields, test.y.shape[1], seed)
            with pools_of(variant):
                fit(model, train, val, TrainConfig(epochs=2, patience=1, seed=seed, device="cpu", progress=False))
            probs = load_model(save_model(os.path.join(root, f"auc-{variant}-{seed}"), model.eval(), encoder,
                                          train_ds.spec)).predict_table(test_ds.table, recalibrate=False)
            labels = test.y.numpy()
            out.setdefault(variant, []).append(float(np.mean([auc(labels[:, i], probs[:, i])
                                                              for i in range(labels.shape[1])])))
            print(json.dumps({"test_auc_mean": out}), file=sys.stderr, flush=True)
    return out


def gpu_samples_per_s(rows: int) -> dict[str, float] | None:
    """APEM and Shared-Bottom training samples/s on CUDA as ``bench_gpu.py`` measures them (its synthetic
    ``rows``, bf16 autocast, batch 16384, one timed epoch after a warm-up), or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    settings = argparse.Namespace(device="cuda", batch_size=bench_gpu.BATCH_SIZE, precision=bench_gpu.PRECISION)
    with bench_gpu.float32_matmul_precision("high"):
        train, test, fields, n_tasks = bench_gpu.prepared_on_device(rows, torch.device("cuda"))
        return {name: bench_gpu.measure(name, train, test, fields, n_tasks, settings)["samples_per_s"]
                for name in ("apem", "shared_bottom")}


def matmul_flops_per_row(models: dict, data: EncodedData, batch: int = 1024) -> dict[str, dict[str, float]]:
    """Matrix-product FLOPs per row (mm, bmm, addmm, baddbmm; ``FlopCounterMode`` counts no elementwise
    op) of one training step (forward + backward) and of one predict forward (``inference_module``, so
    FoldedAPEM for APEM). Beside the time ratios, this tells compute from everything else: where the
    time ratio is far above the FLOP ratio, the gap is elementwise, memory-bound and per-call work.
    APEM's poolings are counted through torch: the counter cannot see into the C kernels."""
    x = data.x[:batch]
    out = {}
    for name in ("shared_bottom", "ple", "apem"):
        model = models[name].train()
        with FlopCounterMode(display=False) as train_count, pools_of("apem_torch_pools"):
            model(x).probs.sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        with FlopCounterMode(display=False) as predict_count, torch.no_grad(), pools_of("apem_torch_pools"):
            model.inference_module(len(x))(x)
        out[name] = {"train": train_count.get_total_flops() / len(x), "predict": predict_count.get_total_flops() / len(x)}
    return out


def flop_rows(flops: dict) -> list[tuple[str, str, str]]:
    sb = flops["shared_bottom"]
    return [(f"matmul FLOPs/row {phase}, APEM / Shared-Bottom (PLE / Shared-Bottom)",
             f"{flops['apem'][phase] / sb[phase]:.2f} ({flops['ple'][phase] / sb[phase]:.2f}); "
             f"{flops['apem'][phase] / 1e3:,.0f}k vs {sb[phase] / 1e3:,.0f}k", "(context: compute floor of the time ratio)")
            for phase in ("train", "predict")]


def table_rows(rows: int, train_rounds: dict, predict_rounds: dict, aucs: dict,
               gpu: dict | None) -> list[tuple[str, str, str]]:
    """(figure, measured, goal) for every row of issue 9's table, reference-path figures beside."""
    out, train_s = [], {name: sum(values) for name, values in train_rounds.items()}
    fastest = {name: min(values) for name, values in predict_rounds.items()}
    for variant in ("apem", UNFUSED, TABLES, "apem_all_points", "apem_previous_tables", "apem_fixed_rate",
                    "apem_fixed_rate_previous_tables", "apem_nothing", "apem_nothing_all_points", "apem_reference"):
        if variant not in train_s:  # a predict-only variant
            out += [(f"predict e2e {variant} / Shared-Bottom", time_ratio(predict_rounds, variant, "shared_bottom"),
                     "<= 2.0 (stretch 1.34)"),
                    (f"predict e2e {variant} rows/s", f"{rows / fastest[variant]:,.0f}", ">= 100,000")]
            continue
        out += [(f"train {variant} / Shared-Bottom", time_ratio(train_rounds, variant, "shared_bottom"),
                 "<= 4.0 (stretch 2)"),
                (f"train {variant} / PLE", time_ratio(train_rounds, variant, "ple"), "<= 1.0"),
                (f"predict e2e {variant} / Shared-Bottom", time_ratio(predict_rounds, variant, "shared_bottom"),
                 "<= 2.0 (stretch 1.34)"),
                (f"predict e2e {variant} rows/s", f"{rows / fastest[variant]:,.0f}", ">= 100,000 (stretch 190,000)")]
    torch_pools = train_s["apem_torch_pools"]  # the default APEM without the C kernels, same run
    out += [("train apem_torch_pools / Shared-Bottom", f"{torch_pools / train_s['shared_bottom']:.2f}",
             "(before: torch poolings)"),
            ("train apem_torch_pools / apem (the kernels' speed-up)", f"{torch_pools / train_s['apem']:.2f}", "(context)")]
    every_point = train_s["apem_every_point"]  # training over all K points of every layer, same run
    out += [("train apem_every_point / PLE", f"{every_point / train_s['ple']:.2f}", "(before: every point)"),
            ("train apem_every_point / apem (the kept points' speed-up)", f"{every_point / train_s['apem']:.2f}",
             "(context)"),
            ("train apem_two_kernels / apem_every_point (one kernel for eq. 14-18: its speed-up)",
             f"{train_s['apem_two_kernels'] / every_point:.2f}", "(context)")]
    direct = train_s["apem_direct"]  # training before the distinct-rows ASRG, same run
    out += [("train apem_direct / Shared-Bottom", f"{direct / train_s['shared_bottom']:.2f}", "(before: direct path)"),
            ("train apem_direct / PLE", f"{direct / train_s['ple']:.2f}", "(before: direct path)")]
    for variant, values in aucs.items():
        out.append((f"test AUC {variant}, per seed", " / ".join(f"{v:.4f}" for v in values), "unchanged within seed noise"))
    out.append((f"GPU train APEM samples/s ({bench_gpu.PRECISION}, batch {bench_gpu.BATCH_SIZE})", f"{gpu['apem']:,.0f} (Shared-Bottom {gpu['shared_bottom']:,.0f})"
                if gpu else "not measured: no CUDA device", ">= 600,000"))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--predict-batch-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="training rounds (chunks of the rows)")
    parser.add_argument("--predict-rounds", type=int, default=5, help="end-to-end predict passes of every model")
    parser.add_argument("--request-repeats", type=int, default=40, help="served requests per size and model")
    parser.add_argument("--auc-rows", type=int, default=60_000)
    parser.add_argument("--gpu-rows", type=int, default=2_000_000, help="synthetic rows of the GPU row (CUDA only)")
    parser.add_argument("--auc-seeds", type=int, nargs="*", default=[0, 1], help="none: skip the AUC check")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo: not ours to time
    with tempfile.TemporaryDirectory() as root:
        data_dir = os.path.join(root, "data")
        write_synthetic_dataset(SynthConfig(rows=args.rows, days=30, seed=0), data_dir)
        dataset = read_dataset(data_dir)
        encoder = FeatureEncoder(dataset.spec).fit(dataset)
        data = encode_dataset(dataset, encoder)
        n_tasks = data.y.shape[1]
        models = {name: build(name, encoder.fields, n_tasks) for name in VARIANTS}
        flops = matmul_flops_per_row(models, data)
        train_rounds = time_training(models, data, args)
        train_s = {name: sum(values) for name, values in train_rounds.items()}
        print(json.dumps({"train_seconds": train_s, "train_seconds_per_round": train_rounds}), file=sys.stderr,
              flush=True)  # partial results survive a timeout
        predict_models = {k: models[k] for k in ("shared_bottom", "apem", "apem_fixed_rate", "apem_nothing",
                                                "apem_reference")}
        predict_rounds = time_predict(predict_models, encoder, dataset.spec, data_dir, root, args)
        predict_s = {name: min(values) for name, values in predict_rounds.items()}  # the fastest pass
        print(json.dumps({"predict_end_to_end_seconds": predict_s}), file=sys.stderr, flush=True)
        request_ms = time_requests(root, data_dir, args)
        aucs = auc_check(root, args) if args.auc_seeds else {}
        gpu = gpu_samples_per_s(args.gpu_rows)
    rows = len(data)
    report = {"rows": rows, "threads": args.threads, "train_batch_size": args.batch_size,
              "predict_batch_size": args.predict_batch_size, "rounds": args.rounds,
              "predict_rounds": args.predict_rounds, "auc_rows": args.auc_rows,
              "auc_seeds": args.auc_seeds, "load_average": os.getloadavg(), "train_seconds": train_s,
              "train_seconds_per_round": train_rounds,
              "predict_end_to_end_seconds": predict_s, "predict_end_to_end_seconds_per_round": predict_rounds,
              "served_request_ms": request_ms, "test_auc_mean": aucs,
              "matmul_flops_per_row": flops, "gpu_samples_per_s": gpu}
    print(json.dumps(report, indent=2))
    print(f"\n{rows:,} rows, {args.threads} threads, train batch {args.batch_size}, predict batch "
          f"{args.predict_batch_size}, load average {os.getloadavg()[0]:.1f}\n\n| figure | measured | goal |\n|---|---|---|")
    for figure, measured, goal in (table_rows(rows, train_rounds, predict_rounds, aucs, gpu) + request_rows(request_ms)
                                   + flop_rows(flops)):
        print(f"| {figure} | {measured} | {goal} |")
    return report


if __name__ == "__main__":
    main()
