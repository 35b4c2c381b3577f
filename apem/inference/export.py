"""Export of a saved model directory for serving runtimes."""

from __future__ import annotations

import os

import torch

from apem.data.atomic import atomic_file
from apem.inference.model_dir import load_model
from apem.models.base import MultiTaskModel


class ProbabilitiesOnly(torch.nn.Module):
    """A traceable wrapper: (B, F + D) encoded inputs -> the (B, N) probability tensor alone."""

    def __init__(self, inner: MultiTaskModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).probs


def export_torchscript(model_dir: str, out_path: str) -> str:
    """Trace the saved model to TorchScript for serving: (B, F + D) int64 encoded inputs (features.json: indices, then dense_log values) -> (B, N) probabilities.

    The traced graph does not include feature encoding or recalibration; servers encode with
    ``features.json`` (or :class:`LoadedModel`) and apply ``meta.negative_rate`` themselves.
    """
    loaded = load_model(model_dir)
    example = torch.zeros((4, loaded.encoder.input_width), dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(ProbabilitiesOnly(loaded.model).eval(), example, check_trace=False)
    out_path = os.path.abspath(out_path)
    with atomic_file(out_path) as tmp:
        traced.save(tmp)
    return out_path
