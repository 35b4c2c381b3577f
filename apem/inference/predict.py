"""Batch prediction of any registry model: encoded (n, F) indices -> (n, N) probabilities."""

from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 2048,
            device: str | torch.device = "cpu") -> np.ndarray:
    """(n, N) entire-space probabilities in eval mode. Batches of 2048 keep APEM's attention
    scores (L M K F floats per row) near 64 MB and in cache-friendlier pieces; larger batches only
    add memory (measured: 512-2048 rows per batch is fastest on CPU)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    fast = model.inference_module(x.shape[0]) if hasattr(model, "inference_module") else model  # e.g. APEM's tables
    parts = [fast(x[i:i + batch_size].to(device, non_blocking=True)).probs.float().cpu()
             for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.n_tasks), np.float32)
