"""Issue 14's table in one command: the scale-out figures, each against its goal.

Runs the three benchmarks that measure them, each as a subprocess at the sizes given, and prints
one JSON object with the table (figure, measured, goal, met) plus every benchmark's raw answer:

1. ``apem pipeline run-local`` on ``--impressions`` impressions over 14 days, raw logs to champion
   (``bench_pipeline.py --no-reference``, logs generated first and not timed): wall time, time per
   task, peak memory (summed RSS of run-local's process tree, sampled from /proc, over the run and
   per task; the log generator's peak apart), the AUCs.
   Goal at 10M impressions on 2 cores: <= 10 min, peak <= 8 GB.
2. ingest rows/s on Beam's DirectRunner against the single-process ingest, same logs
   (``bench_ingest.py``, ``--ingest-impressions``). Goal: >= 0.5x at 1M, better than it at 10M.
3. trainer peak memory at N and 3N training rows, and 4. training samples/s streaming against
   in-memory, same model (``bench_streaming.py``, ``--train-rows N 3N``). Goals: peak at 3N within
   1.2x of N (streaming); samples/s >= 0.8x.

    nice -n 15 .venv/bin/python benchmarks/bench_scale.py --impressions 10000000 --ingest-impressions 1000000 \\
        --train-rows 10000000 30000000

The defaults (1M impressions, 300K for ingest, 1M/3M training rows) take about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_ingest import run_sampled  # noqa: E402


def run_measured(args: list[str]) -> tuple[dict, int, float]:
    """Run ``python args...``; return the last JSON object it printed, its tree's peak RSS and its wall time."""
    started = time.perf_counter()
    out, code, peak = run_sampled([sys.executable, *args], stderr=None, every_s=0.5)
    if code:
        raise SystemExit(f"{args[0]} failed with exit code {code}")
    start = out.rfind("\n{\n")  # each benchmark ends with one indented JSON object
    return json.loads(out[start + 1 if start >= 0 else out.index("{"):]), peak, time.perf_counter() - started


def pipeline_row(answer: dict, impressions: int) -> dict:
    """The run-local row: wall time and the peak of run-local's own process tree (the log generator runs
    before it and is reported apart, ``generate_peak_mb``), with each task's seconds and peak."""
    pipeline = answer["pipeline"]
    wall, peak_mb = pipeline["wall_seconds"], pipeline["peak_tree_rss_mb"]
    return {"figure": f"run-local, {impressions:,} impressions (14 days), raw logs to champion",
            "measured": f"{wall / 60:.1f} min, peak {peak_mb / 1024:.1f} GB", "goal": "<= 10 min, peak <= 8 GB (at 10M)",
            "met": wall <= 600 and peak_mb <= 8 * 1024, "tasks_s": pipeline["tasks"],
            "tasks_peak_mb": pipeline["task_peak_tree_rss_mb"], "generate_peak_mb": answer["generate_peak_rss_mb"],
            "closing_note": pipeline["closing_note"]}


def ingest_row(answer: dict, impressions: int) -> dict:
    ratios = {engine: r.get("ratio_vs_local") for engine, r in answer["results"].items() if engine != "local"}
    best = max(v for v in ratios.values() if v is not None)
    return {"figure": f"ingest rows/s, Beam DirectRunner / single process, {impressions:,} impressions",
            "measured": ratios, "goal": ">= 0.5x at 1M, > 1x at 10M", "met": best >= (1.0 if impressions >= 10**7 else 0.5)}


def streaming_rows(answer: dict) -> list[dict]:
    summary = answer["summary"]
    growth_key = next(k for k in summary if k.startswith("peak_growth_"))
    growth = summary[growth_key].get("streaming")
    ratios = {model: {k: v for k, v in row.items() if k.startswith("ratio_")}
              for model, row in summary["samples_per_s"].items() if not model.startswith("(")}  # not "(data only)"
    best = min(max(r.values()) for r in ratios.values()) if ratios else None
    return [{"figure": f"trainer peak memory, streaming, {growth_key[len('peak_growth_'):]}",
             "measured": {"growth": summary[growth_key], "peak_rss_mb": summary["peak_rss_mb"]},
             "goal": "streaming growth <= 1.2", "met": growth is not None and growth <= 1.2},
            {"figure": "training samples/s, streaming / in-memory, same model", "measured": ratios,
             "goal": ">= 0.8x", "met": best is not None and best >= 0.8}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=1_000_000, help="run-local's impressions")
    parser.add_argument("--ingest-impressions", type=int, default=300_000)
    parser.add_argument("--train-rows", type=int, nargs=2, default=[1_000_000, 3_000_000], metavar=("N", "3N"))
    parser.add_argument("--streaming-steps", type=int, default=250)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                        help="run-local's pipeline parameters, e.g. --param data_engine='\"beam\"' (repeatable)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "apem-bench-scale"))
    args = parser.parse_args()
    raw_answers, table = {}, []
    answer, _, _ = run_measured([os.path.join(HERE, "bench_pipeline.py"), "--rows", str(args.impressions),
                                 "--no-reference", "--workdir", os.path.join(args.workdir, "pipeline"),
                                 *[arg for param in args.param for arg in ("--param", param)]])
    raw_answers["pipeline"] = answer
    table.append(pipeline_row(answer, args.impressions))
    answer, _, _ = run_measured([os.path.join(HERE, "bench_ingest.py"), "--impressions", str(args.ingest_impressions),
                                 "--engines", "local", "beam_in_memory", "beam_multi_processing"])
    raw_answers["ingest"] = answer
    table.append(ingest_row(answer, args.ingest_impressions))
    answer, _, _ = run_measured([os.path.join(HERE, "bench_streaming.py"), "--rows", *map(str, args.train_rows),
                                 "--steps", str(args.streaming_steps),
                                 "--workdir", os.path.join(args.workdir, "streaming")])
    raw_answers["streaming"] = answer
    table.extend(streaming_rows(answer))
    print(json.dumps({"cpus": os.cpu_count(), "table": table, "benchmarks": raw_answers}, indent=2))


if __name__ == "__main__":
    main()
