"""Training throughput of every model on the same synthetic data, as ratios to Shared-Bottom.

Every model trains one epoch through the project trainer (``apem.train.trainer.fit``, no validation) on
the same pre-encoded rows, after a short warm-up epoch on a slice; samples/s = rows / seconds of the
measured epoch. Shared-Bottom is the reference measured in the same run (the issue's goal: APEM's
training time at most 1.5x Shared-Bottom's; the paper's was 4.0x). Prints JSON and a markdown table.

    .venv/bin/python benchmarks/bench_models.py --rows 100000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

REFERENCE = "shared_bottom"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="all", help="comma-separated model names or all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    from apem.research.experiment import resolve_model_names
    from apem.data.encoding import FeatureEncoder
    from apem.models.registry import build_model
    from apem.data.spec import Dataset
    from apem.data.features import default_spec
    from apem.research.synth import SynthConfig, generate
    from apem.train.trainer import EncodedData, TrainConfig, encode_dataset, fit, set_seed

    torch.set_num_threads(args.threads)
    names = resolve_model_names(args.models)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    table, _ = generate(SynthConfig(rows=args.rows, days=30, seed=0))
    dataset = Dataset(default_spec(), table)
    encoder = FeatureEncoder(dataset.spec).fit(dataset)
    data = encode_dataset(dataset, encoder)
    warmup = EncodedData(x=data.x[: 5 * args.batch_size], y=data.y[: 5 * args.batch_size])
    results: dict[str, dict] = {}
    for name in names:
        set_seed(0)
        model = build_model(name, encoder.fields, data.y.shape[1])
        config = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0, device=args.device,
                             num_threads=args.threads, progress=False)
        fit(model, warmup, None, config)
        start = time.perf_counter()
        fit(model, data, None, config)
        seconds = time.perf_counter() - start
        results[name] = {"train_seconds": seconds, "samples_per_s": len(data.x) / seconds,
                         "parameters": sum(p.numel() for p in model.parameters())}
    reference = results[REFERENCE]["train_seconds"]
    for entry in results.values():
        entry["time_ratio_to_shared_bottom"] = entry["train_seconds"] / reference
    report = {"rows": args.rows, "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
              "reference": REFERENCE, "models": results}
    if "apem" in results:
        report["apem_time_ratio_goal_1_5_met"] = results["apem"]["time_ratio_to_shared_bottom"] <= 1.5
    print(json.dumps(report, indent=2))
    print("\n| model | samples/s | train time / Shared-Bottom | parameters |\n|---|---|---|---|")
    for name, entry in results.items():
        print(f"| {name} | {entry['samples_per_s']:,.0f} | {entry['time_ratio_to_shared_bottom']:.2f} "
              f"| {entry['parameters']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
