"""Throughput and peak memory of ``apem ingest`` on Beam (DirectRunner) against the single-process ingest.

Same generated raw logs (``write_synthetic_events``, JSONL), same rules (the Beam path calls the
rule functions of ``apem.dataplane.ingest``), measured in the same run. Each engine runs in its own
child process; wall time is measured inside it around the ingest call (imports excluded, Beam's
pipeline start-up included). Peak memory: the child's ``ru_maxrss`` (and its largest worker's, for
multi-process Beam), plus the peak of the summed RSS of the child's whole process tree, sampled from
/proc every 0.1 s. Both engines must give the same rows and quarantine counts.

    nice -n 15 .venv/bin/python benchmarks/bench_ingest.py                 # 300K impressions, 14 days
    nice -n 15 .venv/bin/python benchmarks/bench_ingest.py --impressions 1000000 --workdir /tmp/bench-ingest

Goal (issue 14): Beam rows/s >= 0.5x the single-process ingest at 1M impressions, better at 10M.
The default is 300K impressions, not 1M: on 2 cores shared with other work, 1M took 15 min
(generating the logs 4 min, each engine 2-3 min; about 4 min on a quiet machine); the default run
took 2 min 10 s (300K: local 12.0 s, Beam in_memory 26.1 s = 0.46x, multi_processing 57.0 s = 0.21x:
pipeline and worker start-up weigh more on a small window).

Measured, 1M impressions, 14 days (1,084,713 events, 996,759 rows out, 7 shards), 2 cores:
- quiet machine (load ~1): single-process 41.1 s (24,238 rows/s, peak 1.47 GB); Beam DirectRunner
  in_memory 67.4 s (14,791 rows/s, 0.61x, peak 1.98 GB); multi_processing, 2 workers, 65.2 s
  (15,300 rows/s, 0.63x, peak 3.9 GB summed over the launcher and its 2 workers, largest 1.5 GB).
- busy machine (4 jobs on the 2 cores, load 4-8): single-process 176.8 s, Beam in_memory 139.6 s
  (1.27x), multi_processing 123.2 s (1.43x): under contention the ratio says little.

The single-process ingest, day by day against the whole-window version it replaced (same output, row
for row; ``--engines local_baseline local --baseline-checkout DIR`` with DIR a worktree of commit
cbc415e), same run, busy machine (load ~8 on 2 cores), 14 days:
- 1M impressions: peak RSS 1,432 -> 610 MB (0.43x); 154.4 -> 128.0 s (1.21x the rows/s).
- 3M impressions: peak RSS 3,958 -> 1,297 MB (0.33x); 354.1 -> 374.0 s (0.95x); the staged
  impressions peaked at ~445 MB of disk. By the same lines, 10M: ~3.4 GB instead of ~13 GB (12.8 GB
  measured in the 10M pipeline run). Speed: about the same (the contention blurs a 20% difference).
  On a quiet machine the day-by-day version was 1.25x slower at 1M (45.2 vs 36.1 s).

The staged impressions kept in memory up to ``stage_memory_bytes`` (768 MB estimated; 1M impressions
are estimated at 0.53 GB, so none spill) and presence taken from Arrow in the feature checks, against
the whole-window version (cbc415e) and the day-by-day one that spilled everything (e03a87e), 14 days,
``--engines local local_baseline --baseline-checkout WW --baseline-checkout DBD`` (and one bench per
checkout run alongside), under nice 15 on 2 cores that four other jobs kept busy (load 6-15; each
ingest got 3-20% of a core, so wall times of 4-34 min say nothing: the figure is CPU seconds, user+sys):
- 1M: this version 45.4 s CPU, peak RSS 1,000 MB; whole-window 47.2 s (47.3 s in the bench beside),
  1,470 MB; day-by-day 55.6 s (57.7 s beside), 597 MB. Against the whole-window version: 1.04x the
  speed, 0.68x the peak; against the day-by-day one: 1.22x the speed, 1.68x the peak (the staged
  impressions now held in memory). Repeated alone later (``ingest`` timed in-process, load ~7):
  50.0 s, 981 MB; with ``stage_memory_bytes`` 200 MB (part spilled) beside it: 54.2 s, 761 MB. Both
  byte-identical to the day-by-day version's output (part file, quarantine, summary, oracle). So: the
  whole-window version's speed, within the ~10% that repeats vary by under this load.
- 3M (2,990,688 rows): this version 151.2 s CPU, peak 1,550 MB; whole-window 155.6 s, 3,968 MB
  (run alongside): 1.03x the speed, 0.39x the peak. Day-by-day, earlier run above: 1,297 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ENGINES = {  # name -> DirectRunner options (None: the single-process ingest)
    "local": None,
    "local_baseline": None,  # the single-process ingest of another checkout (--baseline-checkout)
    "beam_in_memory": ["--direct_running_mode=in_memory"],
    "beam_multi_processing": ["--direct_running_mode=multi_processing"],
    "beam_multi_threading": ["--direct_running_mode=multi_threading"],
}


def tree_rss_bytes(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants, from /proc."""
    parents, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parents[int(name)] = int(fields[1])
            rss[int(name)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in tree)


def run_sampled(command: list[str], stderr=subprocess.DEVNULL, every_s: float = 0.1,
                env: dict | None = None, samples: list | None = None) -> tuple[str, int, int]:
    """Run ``command``; return its stdout, exit code and the peak summed RSS of its process tree.
    With ``samples``, every sample is appended to it as (``time.time()``, bytes)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            rss = tree_rss_bytes(proc.pid)
            peak[0] = max(peak[0], rss)
            if samples is not None:
                samples.append((time.time(), rss))
            time.sleep(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    return out, proc.returncode, peak[0]


def _run_child(args: list[str], pythonpath: str | None = None) -> tuple[dict, int]:
    """Run this script as a child with ``args`` (importing ``apem`` from ``pythonpath`` first, when
    given); return its JSON answer and its tree's peak RSS."""
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}
    out, code, peak = run_sampled([sys.executable, __file__, *args], env=env)
    if code:
        raise RuntimeError(f"child {args} failed with code {code}")
    return json.loads(out.strip().splitlines()[-1]), peak


def _child_generate(raw: str, impressions: int, days: int) -> dict:
    from apem.research.synth import SynthConfig
    from apem.research.synth_events import write_synthetic_events

    config = SynthConfig(rows=impressions, days=days, seed=0)
    write_synthetic_events(config, raw)
    return {"start": config.start.isoformat(), "end": (config.start + dt.timedelta(days=days - 1)).isoformat()}


def _child_ingest(engine: str, raw: str, out: str, start: str, end: str, workers: int) -> dict:
    if ENGINES[engine] is None:
        from apem.dataplane.ingest import ingest as run
        kwargs = {}
    else:
        from apem.dataplane.ingest_beam import ingest_beam as run
        kwargs = {"pipeline_args": ENGINES[engine] + [f"--direct_num_workers={workers}"]}
    began, cpu_began = time.perf_counter(), os.times()
    summary = run(raw, dt.date.fromisoformat(start), dt.date.fromisoformat(end), out, overwrite=True, **kwargs)
    seconds, cpu = time.perf_counter() - began, os.times()
    cpu_seconds = sum(getattr(cpu, f) - getattr(cpu_began, f) for f in ("user", "system", "children_user", "children_system"))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rows": summary["rows"], "events_read": summary["events_read"],
            "quarantine": summary["quarantine"], "shards": summary.get("shards"),
            "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "maxrss_largest_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _runs(engines: list[str], baselines: list[str]) -> list[tuple[str, str, str | None]]:
    """(result name, engine, checkout to import apem from) for each run: local_baseline once per checkout."""
    runs = []
    for engine in engines:
        if engine != "local_baseline":
            runs.append((engine, engine, None))
        for k, checkout in enumerate(baselines if engine == "local_baseline" else []):
            runs.append((engine if len(baselines) == 1 else f"{engine}_{k + 1}", engine, checkout))
    return runs


def _measure(engines: list[str], raw: str, work: str, window: dict, workers: int, baselines: list[str],
             keep_outputs: bool = False) -> dict:
    results = {}
    for name, engine, checkout in _runs(engines, baselines):
        answer, peak = _run_child(["--child", "ingest", engine, raw, os.path.join(work, f"out-{name}"),
                                   window["start"], window["end"], str(workers)], pythonpath=checkout)
        results[name] = {
            "checkout": checkout, "seconds": round(answer["seconds"], 2), "cpu_seconds": round(answer["cpu_seconds"], 1),
            "rows": answer["rows"], "events_read": answer["events_read"],
            "rows_per_s": round(answer["rows"] / answer["seconds"]),
            "events_per_s": round(answer["events_read"] / answer["seconds"]),
            "peak_tree_rss_mb": round(peak / 2**20), "maxrss_self_mb": round(answer["maxrss_self_mb"]),
            "maxrss_largest_worker_mb": round(answer["maxrss_largest_worker_mb"]),
            "quarantine": answer["quarantine"], "shards": answer["shards"],
            "load_average_after": [round(x, 1) for x in os.getloadavg()]}
        print(json.dumps({name: results[name]}), flush=True)
        if keep_outputs:
            continue
        shutil.rmtree(os.path.join(work, f"out-{name}"), ignore_errors=True)
        shutil.rmtree(os.path.join(work, f"out-{name}_quarantine"), ignore_errors=True)
    return results


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "generate":
            answer = _child_generate(rest[0], int(rest[1]), int(rest[2]))
        else:
            answer = _child_ingest(rest[0], rest[1], rest[2], rest[3], rest[4], int(rest[5]))
        print(json.dumps(answer))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=300_000, help="1M: the issue's figure (~15 min here)")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--engines", nargs="+", default=["local", "beam_in_memory", "beam_multi_processing"],
                        choices=list(ENGINES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="--direct_num_workers for the multi-process and multi-thread modes")
    parser.add_argument("--workdir", default=None, help="keep the generated logs here (reused when present)")
    parser.add_argument("--baseline-checkout", action="append", default=[],
                        help="a checkout of an earlier commit (git worktree add DIR COMMIT): the engine "
                             "local_baseline runs its single-process ingest, for before/after in one run; "
                             "repeat it to compare several (results local_baseline_1, _2, ...)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep each engine's dataset (WORKDIR/out-ENGINE) and quarantine, e.g. to validate them next")
    args = parser.parse_args()
    if "local_baseline" in args.engines and not args.baseline_checkout:
        parser.error("the engine local_baseline needs --baseline-checkout")

    work = args.workdir or tempfile.mkdtemp(prefix="bench-ingest-")
    raw = os.path.join(work, f"raw-{args.impressions}-{args.days}")
    window_file = raw + ".window.json"
    began = time.perf_counter()
    if not os.path.exists(window_file):
        window, generate_peak = _run_child(["--child", "generate", raw, str(args.impressions), str(args.days)])
        with open(window_file, "w") as fh:
            json.dump(window, fh)
    with open(window_file) as fh:
        window = json.load(fh)
    generated_s = time.perf_counter() - began
    results = _measure(args.engines, raw, work, window, args.workers, args.baseline_checkout,
                       args.keep_outputs)
    reference = results.get("local")
    for engine, result in results.items():
        if reference and engine != "local":
            assert (result["rows"], result["quarantine"]) == (reference["rows"], reference["quarantine"]), engine
            result["ratio_vs_local"] = round(result["rows_per_s"] / reference["rows_per_s"], 3)
            result["cpu_ratio_vs_local"] = round(reference["cpu_seconds"] / result["cpu_seconds"], 3)
            result["peak_ratio_vs_local"] = round(result["peak_tree_rss_mb"] / reference["peak_tree_rss_mb"], 3)
    print(json.dumps({"impressions": args.impressions, "days": args.days, "cpu_count": os.cpu_count(),
                      "workers": args.workers, "generate_s": round(generated_s, 1), "window": window,
                      "results": results}, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
