"""Throughput of ``apem split`` (Beam) against a single-process pyarrow split of the same data.

Both sides do the same work through the same helpers (day counts of the time column, the day plan,
``assign_batch`` for routing and hash-based negative downsampling, Parquet out, the oracle join):
the only difference is the engine. Reported as rows/s and the ratio Beam / pyarrow, measured in
the same run on the same files. Goal: ratio >= 0.5.

    nice .venv/bin/python benchmarks/bench_split.py --rows 1000000 5000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apem.data.spec import DatasetSpec, parquet_files
from apem.data.split_record import SPLITS
from apem.dataplane.split import assign_batch, day_counts, plan_boundaries, split_dataset
from apem.data.oracle import ORACLE_DIR, ORACLE_FILE
from apem.research.synth import SynthConfig, write_synthetic_dataset


def pyarrow_split(data_dir: str, out_dir: str, negative_rate: float, ratios=(8, 1, 1)) -> dict:
    """The reference: one process, whole files as Arrow tables, same routing function."""
    spec = DatasetSpec.read(data_dir)
    files = parquet_files(data_dir)
    plan = plan_boundaries(day_counts(files, spec.time_column), ratios)
    writers: dict[str, pq.ParquetWriter] = {}
    rows = {s: 0 for s in SPLITS}
    ids: dict[str, list] = {s: [] for s in SPLITS}
    for file in files:
        table = pq.read_table(file)
        for split, part in assign_batch(table, plan, spec.time_column, spec.labels[0], spec.id_column,
                                        negative_rate).items():
            if split not in writers:
                os.makedirs(os.path.join(out_dir, split), exist_ok=True)
                writers[split] = pq.ParquetWriter(os.path.join(out_dir, split, "part-00000.parquet"), table.schema)
            writers[split].write_table(part)
            rows[split] += part.num_rows
            ids[split].append(part.column(spec.id_column))
    for split, writer in writers.items():
        writer.close()
        spec.write(os.path.join(out_dir, split))
    oracle = pq.read_table(os.path.join(data_dir, ORACLE_DIR, ORACLE_FILE))
    for split in SPLITS:
        value_set = pa.chunked_array([c for col in ids[split] for c in col.chunks]).combine_chunks()
        os.makedirs(os.path.join(out_dir, split, ORACLE_DIR), exist_ok=True)
        pq.write_table(oracle.filter(pc.is_in(oracle.column(spec.id_column), value_set=value_set)),
                       os.path.join(out_dir, split, ORACLE_DIR, ORACLE_FILE))
    with open(os.path.join(out_dir, "split.json"), "w") as fh:
        json.dump({"rows": rows}, fh)
    return rows


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--neg-rate", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="+", default=["multi_processing", "in_memory"],
                        help="DirectRunner running modes to measure")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side (warm file cache)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-split-")
    results = []
    for n in args.rows:
        data = os.path.join(work, f"data-{n}")
        if not os.path.exists(os.path.join(data, "spec.yaml")):
            write_synthetic_dataset(SynthConfig(rows=n, days=args.days, seed=0), data)
        ref_s, ref_rows = min((_timed(pyarrow_split, data, os.path.join(work, f"ref-{n}-{i}"), args.neg_rate)
                              for i in range(args.repeats)), key=lambda r: r[0])
        row = {"rows": n, "pyarrow_s": round(ref_s, 2), "pyarrow_rows_per_s": round(n / ref_s)}
        for mode in args.modes:
            workers = args.workers if mode == "multi_processing" else 1
            beam_s, summary = min((_timed(
                split_dataset, data, os.path.join(work, f"beam-{mode}-{n}-{i}"), negative_rate=args.neg_rate,
                pipeline_args=[f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"])
                for i in range(args.repeats)), key=lambda r: r[0])
            after = {s: summary["rows"][s]["after_sampling"] for s in SPLITS}
            assert after == ref_rows, (after, ref_rows)  # same work, same answer
            row[f"beam_{mode}_s"] = round(beam_s, 2)
            row[f"beam_{mode}_rows_per_s"] = round(n / beam_s)
            row[f"ratio_{mode}"] = round(ref_s / beam_s, 3)
        results.append(row)
        print(json.dumps(row), flush=True)
        for name in os.listdir(work):
            if name.startswith(("ref-", "beam-")):
                shutil.rmtree(os.path.join(work, name))
    print(json.dumps({"cpu_count": os.cpu_count(), "workers": args.workers, "neg_rate": args.neg_rate,
                      "results": results}, indent=2))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
