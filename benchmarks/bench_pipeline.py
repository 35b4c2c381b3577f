"""Wall time of ``apem pipeline run-local`` (what ``make run`` does) and where it goes.

    .venv/bin/python benchmarks/bench_pipeline.py [--rows 1000000] [--days 14] [--workdir runs/bench]

1. Generates the synthetic raw logs once (timed apart: a real run reads existing logs).
2. Times ``apem pipeline run-local`` as a subprocess, as a user runs it, with its defaults (or
   ``--param KEY=JSON``), and reads each task's wall time from kfp.local's log. Memory: the summed
   RSS of run-local's process tree (its task subprocesses and their Beam workers), sampled from
   /proc every 0.5 s; its peak over the run and over each task's window. The log generator runs
   before, in this process, and its own peak is reported apart (it is not part of the pipeline).
3. Reference, measured in the same run on the same logs: the same six component functions called
   one after the other in one Python process (``component.python_func``; no kfp.local, no
   subprocess per task). The ratio pipeline / reference is the cost of running as a pipeline
   (a fresh interpreter and imports per task, artifact bookkeeping).

The goal for 1M impressions on 2 cores is a pipeline wall time of at most 10 minutes.
Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ingest import run_sampled  # noqa: E402

TASK_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (Executing task|Task) .*?'(\w+)'")


def task_windows(log: str) -> dict[str, tuple[float, float]]:
    """Each task's (start, end) in seconds since local midnight, from kfp.local's 'Executing task' /
    'Task ... finished' lines (an end before its start has crossed midnight: 86400 is added)."""
    started, out = {}, {}
    for line in log.splitlines():
        match = TASK_LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if not match:
            continue
        clock = dt.datetime.strptime(match.group(1), "%H:%M:%S.%f")
        stamp = clock.hour * 3600 + clock.minute * 60 + clock.second + clock.microsecond / 1e6
        if match.group(2) == "Executing task":
            started[match.group(3)] = stamp
        elif match.group(3) in started:
            begin = started.pop(match.group(3))
            out[match.group(3)] = (begin, stamp if stamp >= begin else stamp + 86400)
    return out


def task_seconds(log: str) -> dict[str, float]:
    """Per-task wall seconds from kfp.local's log."""
    return {task: round(end - begin, 1) for task, (begin, end) in task_windows(log).items()}


def task_peaks_mb(samples: list[tuple[float, int]], windows: dict[str, tuple[float, float]]) -> dict[str, int | None]:
    """Peak summed RSS (MB) among the samples (``time.time()``, bytes) taken inside each task's window
    (seconds since the local midnight of the run's first sample; None: no sample fell in it)."""
    midnight = dt.datetime.fromtimestamp(samples[0][0]).replace(hour=0, minute=0, second=0, microsecond=0)
    clock = [(t - midnight.timestamp(), rss) for t, rss in samples]  # past 86400 after midnight, as the windows
    first = clock[0][0]
    peaks = {}
    for task, (begin, end) in windows.items():
        if begin < first - 60:  # the task started after the midnight that followed the first sample
            begin, end = begin + 86400, end + 86400
        inside = [rss for t, rss in clock if begin <= t <= end]
        peaks[task] = round(max(inside) / 2**20) if inside else None
    return peaks


def run_pipeline(workdir: str, rows: int, days: int, params: list[str] = ()) -> dict:
    command = [os.path.join(os.path.dirname(sys.executable), "apem"), "pipeline", "run-local",
               "--workdir", workdir, "--rows", str(rows), "--days", str(days)]
    command += [arg for param in params for arg in ("--param", param)]
    samples: list[tuple[float, int]] = []
    start = time.perf_counter()
    log, code, peak = run_sampled(command, stderr=subprocess.STDOUT, every_s=0.5, samples=samples)
    wall = time.perf_counter() - start
    if code != 0:
        sys.stderr.write(log[-10000:])
        raise SystemExit(f"run-local failed with exit code {code}")
    note = log[log.rfind("daily_retrain finished"):]
    return {"wall_seconds": round(wall, 1), "tasks": task_seconds(log), "peak_tree_rss_mb": round(peak / 2**20),
            "task_peak_tree_rss_mb": task_peaks_mb(samples, task_windows(log)) if samples else {},
            "params": list(params), "closing_note": note.strip()}


def run_reference(workdir: str, raw_dir: str, arguments: dict) -> dict:
    """The six component functions in one process, same arguments as the pipeline run."""
    from kfp import dsl

    from apem_kfp.components.evaluate import evaluate
    from apem_kfp.components.ingest import ingest
    from apem_kfp.components.push import push
    from apem_kfp.components.split import split
    from apem_kfp.components.train import train
    from apem_kfp.components.validate import validate

    def art(kind, name):
        return kind(name=name, uri=os.path.join(workdir, "artifacts", name), metadata={})

    os.makedirs(os.path.join(workdir, "artifacts"), exist_ok=True)
    a = {n: art(k, n) for n, k in {
        "dataset": dsl.Dataset, "quarantine": dsl.Dataset, "m1": dsl.Metrics, "stats": dsl.Dataset,
        "vreport": dsl.Markdown, "vhtml": dsl.HTML, "m2": dsl.Metrics, "splits": dsl.Dataset, "m3": dsl.Metrics, "model": dsl.Model,
        "m4": dsl.Metrics, "evaluation": dsl.Artifact, "ereport": dsl.Markdown, "m5": dsl.Metrics,
        "r1": dsl.ClassificationMetrics, "r2": dsl.ClassificationMetrics, "r3": dsl.ClassificationMetrics,
        "preport": dsl.Markdown, "m6": dsl.Metrics}.items()}
    p = arguments
    from apem.release.mlflow_registry import sqlite_tracking_uri

    tracking = sqlite_tracking_uri(os.path.join(workdir, "mlflow"))
    output_root = os.path.join(workdir, "output")
    steps = {
        "ingest": lambda: ingest.python_func(
            raw_uri=raw_dir, run_date=p["run_date"], window_days=p["window_days"], schedule_time="",
            attribution_window_days=3, dataset=a["dataset"], quarantine=a["quarantine"], metrics=a["m1"]),
        "validate": lambda: validate.python_func(
            dataset=a["dataset"], output_root=output_root, warn_only=False, statistics=a["stats"],
            report=a["vreport"], statistics_html=a["vhtml"], metrics=a["m2"]),
        "split": lambda: split.python_func(
            dataset=a["dataset"], negative_rate=p["negative_rate"], split_ratios="8,1,1",
            beam_runner="DirectRunner", beam_args=p.get("beam_args", ""), splits=a["splits"], metrics=a["m3"]),
        "train": lambda: train.python_func(
            splits=a["splits"], model_name=p["model_name"], model_params=p["model_params"], epochs=p["epochs"],
            batch_size=p["batch_size"], lr=p["lr"], seed=p["seed"], mlflow_tracking_uri=tracking,
            model=a["model"], metrics=a["m4"]),
        "evaluate": lambda: evaluate.python_func(
            splits=a["splits"], candidate=a["model"], mlflow_tracking_uri=tracking, registered_model_name="apem",
            alpha=0.05, two_sided=False, primary_task="", primary_tolerance=0.0, chance_margin=0.0,
            bootstrap_resamples=p["bootstrap_resamples"], evaluation=a["evaluation"], report=a["ereport"],
            metrics=a["m5"], roc_click=a["r1"], roc_authorize=a["r2"], roc_convert=a["r3"]),
        "push": lambda: push.python_func(
            candidate=a["model"], evaluation=a["evaluation"], mlflow_tracking_uri=tracking,
            registered_model_name="apem", serving_uri=os.path.join(workdir, "serving"), output_root=output_root,
            report_date=p["run_date"], report=a["preport"], metrics=a["m6"]),
    }
    seconds = {}
    start = time.perf_counter()
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        seconds[name] = round(time.perf_counter() - t0, 1)
    return {"wall_seconds": round(time.perf_counter() - start, 1), "tasks": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench"))
    parser.add_argument("--no-reference", action="store_true", help="only time the pipeline")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--keep-logs", action="store_true",
                        help="reuse the raw logs of an earlier run in WORKDIR (regenerated when rows, days or seed differ)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                        help="passed to run-local, e.g. --param data_engine='\"beam\"' (repeatable)")
    args = parser.parse_args(argv)

    from apem_kfp.pipelines.local_runner import LOCK_FILE, LocalRunConfig, ensure_raw_events, paths, pipeline_arguments

    pipeline_dir = os.path.join(args.workdir, "pipeline")
    raw = paths(pipeline_dir)["raw"]
    # a fresh run: this benchmark's own earlier output goes (WORKDIR/reference, and in WORKDIR/pipeline
    # what run-local writes there: its folders and lock; the logs too unless --keep-logs); anything else stays
    shutil.rmtree(os.path.join(args.workdir, "reference"), ignore_errors=True)
    own = [p for p in paths(pipeline_dir).values() if not (args.keep_logs and p == raw)]
    for path in own + [os.path.join(pipeline_dir, LOCK_FILE)]:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    start = time.perf_counter()
    synth = ensure_raw_events(raw, args.rows, args.days, seed=0)
    generate_seconds = round(time.perf_counter() - start, 1)
    generate_peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # kB; nothing else ran yet

    result = {"rows": args.rows, "days": args.days, "cpus": os.cpu_count(), "generate_seconds": generate_seconds,
              "generate_peak_rss_mb": generate_peak_mb, "pipeline": run_pipeline(pipeline_dir, args.rows, args.days, args.param)}
    result["goal_met"] = result["pipeline"]["wall_seconds"] <= 600
    if not args.no_reference:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        arguments = pipeline_arguments(LocalRunConfig(rows=args.rows, days=args.days), synth)
        result["reference_in_process"] = run_reference(os.path.join(args.workdir, "reference"), raw, arguments)
        result["pipeline_over_reference"] = round(
            result["pipeline"]["wall_seconds"] / result["reference_in_process"]["wall_seconds"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
