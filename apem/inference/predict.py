"""Batch prediction of any registry model: encoded (n, F) indices -> (n, N) probabilities."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
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
    inference module is built once for ``rows`` rows (the total, when known), then each chunk is
    scored in batches of ``batch_size``; only the (n, N) probabilities are kept, in the input's order.
    A model may score a chunk's rows in an order of its choosing (``row_order``: APEM's puts rows that
    share embedding rows side by side)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    fast = model.inference_module(rows) if hasattr(model, "inference_module") else model  # e.g. APEM's tables
    row_order = getattr(fast, "row_order", None)

    def score(x: torch.Tensor, order: torch.Tensor | None, start: int) -> torch.Tensor:
        """The batch of chunk x from row ``start`` of the scoring order (gathered here: no sorted copy of x)."""
        batch = x[start:start + batch_size] if order is None else x.index_select(0, order[start:start + batch_size])
        return fast(batch.to(device, non_blocking=True)).probs.float().cpu()

    workers = torch.get_num_threads() if device.type == "cpu" and getattr(fast, "parallel_batches", False) else 1
    parts = []
    with _batch_map(workers) as score_all:
        for x in chunks:  # one at a time: a stream is never read ahead of its scoring
            order = row_order(x) if row_order is not None and x.shape[0] > batch_size else None
            scored = score_all(partial(score, x, order), range(0, x.shape[0], batch_size))
            if scored:
                probs = torch.cat(scored)
                parts.append(probs if order is None else probs.index_copy(0, order, probs))  # the input's order
    model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.n_tasks), np.float32)


@contextmanager
def _batch_map(workers: int) -> Iterator[Callable[[Callable, Iterable[int]], list[torch.Tensor]]]:
    """A map of a scoring function over a chunk's batches (named by their first row): in turn, or on ``workers``
    threads, each running its ops single-threaded.

    For modules made of many small ops (``parallel_batches = True``, e.g. APEM's lookup tables),
    whole batches side by side use the cores better than splitting every small op across them.
    Torch releases the GIL inside its kernels; inference mode is per thread, so each worker enters it."""
    if workers <= 1:
        yield lambda score, starts: list(map(score, starts))
        return

    def run(score: Callable[[int], torch.Tensor], start: int) -> torch.Tensor:
        with torch.inference_mode():
            return score(start)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield lambda score, starts: list(pool.map(partial(run, score), starts))
    finally:
        torch.set_num_threads(threads)  # the workers' setting must not leak into the caller's
