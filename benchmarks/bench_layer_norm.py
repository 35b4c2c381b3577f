"""LayerNorm over narrow rows: torch's ``layer_norm`` against :func:`apem.nn.layers.rowwise_layer_norm`.

Forward and backward of (rows, width) float32 inputs with an affine, for several widths, on one
device; prints the milliseconds of each and the ratio torch / rowwise (above 1: rowwise is faster),
both measured in the same run. :func:`apem.nn.layers.layer_norm` takes the rowwise form off the CPU
for widths below ``NARROW_ROW_WIDTH``; this is the measurement that rule stands on.

    .venv/bin/python benchmarks/bench_layer_norm.py [--device cuda] [--rows 1048576] [--widths 16,18,32,64,128,256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # apem from this checkout

from apem.nn.layers import NARROW_ROW_WIDTH, rowwise_layer_norm  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(norm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one forward and backward of ``norm``."""
    grad = torch.randn_like(x)
    times = []
    for _ in range(repeats + 2):  # two warm-ups
        synchronize(x.device)
        started = time.perf_counter()
        norm(x, weight, bias, 1e-5).backward(grad)
        synchronize(x.device)
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times[2:])[len(times[2:]) // 2]


def torch_layer_norm(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="default: 2^20 on a GPU, 2^16 on a CPU")
    parser.add_argument("--widths", default="16,18,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = args.rows or (2 ** 20 if device.type == "cuda" else 2 ** 16)
    results = []
    for width in (int(w) for w in args.widths.split(",")):
        torch.manual_seed(0)
        x = torch.randn(rows, width, device=device, requires_grad=True)
        weight = torch.randn(width, device=device, requires_grad=True)
        bias = torch.randn(width, device=device, requires_grad=True)
        reference = time_ms(torch_layer_norm, x, weight, bias, args.repeats)
        rowwise = time_ms(rowwise_layer_norm, x, weight, bias, args.repeats)
        results.append({"width": width, "torch_ms": reference, "rowwise_ms": rowwise,
                        "torch_over_rowwise": reference / rowwise})
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "rows": rows, "narrow_row_width": NARROW_ROW_WIDTH,
                      "forward_and_backward": results}, indent=2))


if __name__ == "__main__":
    main()
