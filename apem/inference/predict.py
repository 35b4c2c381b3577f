"""Batch prediction of any registry model: encoded (n, F) indices -> (n, N) probabilities."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import torch


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 2048,
            device: str | torch.device = "cpu") -> np.ndarray:
    """(n, N) entire-space probabilities in eval mode, in batches of ``batch_size`` rows (APEM's
    lookup-table module splits each batch again into cache-sized chunks, see
    :class:`apem.models.apem_folded.FoldedAPEM`)."""
    return predict_stream(model, [x], x.shape[0], batch_size, device)


@torch.inference_mode()
def predict_stream(model: torch.nn.Module, chunks: Iterable[torch.Tensor], rows: int | None = None,
                   batch_size: int = 2048, device: str | torch.device = "cpu") -> np.ndarray:
    """:func:`predict` over inputs that arrive in chunks (e.g. streamed from Parquet): the model's
    inference module is built once for ``rows`` rows (the total, when known), then every chunk is
    scored in batches of ``batch_size``; only the (n, N) probabilities are kept."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    fast = model.inference_module(rows) if hasattr(model, "inference_module") else model  # e.g. APEM's tables
    batches = (x[i:i + batch_size] for x in chunks for i in range(0, x.shape[0], batch_size))

    def score(batch: torch.Tensor) -> torch.Tensor:
        return fast(batch.to(device, non_blocking=True)).probs.float().cpu()

    workers = torch.get_num_threads() if device.type == "cpu" and getattr(fast, "parallel_batches", False) else 1
    parts = list(map(score, batches)) if workers <= 1 else _map_in_threads(score, batches, workers)
    model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.n_tasks), np.float32)


def _map_in_threads(score: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor],
                    workers: int) -> list[torch.Tensor]:
    """``score`` over the batches on ``workers`` threads, each running its ops single-threaded.

    For modules made of many small ops (``parallel_batches = True``, e.g. APEM's lookup tables),
    whole batches side by side use the cores better than splitting every small op across them.
    Torch releases the GIL inside its kernels; inference mode is per thread, so each worker enters it."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return score(batch)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(run, batches))
    finally:
        torch.set_num_threads(threads)  # the workers' setting must not leak into the caller's
