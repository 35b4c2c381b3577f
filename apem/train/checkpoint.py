"""The trainer's end-of-epoch checkpoint: everything a resumed run needs to continue exactly.

Tensors and JSON-able scalars only, read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from apem.data.atomic import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Progress:
    """Where training stands after an epoch (what early stopping and resume need)."""

    next_epoch: int = 0
    step: int = 0
    best_auc: float = -float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                    best_state: dict[str, torch.Tensor] | None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"model": cpu_state(model), "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
             "best_model": best_state, "progress": json.dumps(asdict(progress))}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and RNG from ``path``; return the progress and the best state so far."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    return Progress(**json.loads(state["progress"])), state["best_model"]
