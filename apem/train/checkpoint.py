"""The trainer's end-of-epoch checkpoint: everything a resumed run needs to continue exactly.

Tensors and JSON-able scalars only, read back with ``weights_only=True``. A checkpoint also records
the identity of the run that wrote it (:func:`run_identity`: model name and config, seed, optimiser
settings, feature encoder and a fingerprint of the training data); resuming compares it field by
field and refuses a checkpoint of another run with :class:`CheckpointMismatch`, so ``--resume``
never continues someone else's weights. A run that finishes removes its checkpoint
(:func:`remove_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import torch

from apem.data.atomic import atomic_file, remove_stale_staging

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run (or cannot be read); one line naming the field."""


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 over the shapes, dtypes and bytes of ``tensors`` (the encoded training data)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def json_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(model, seed: int, optimizer_settings: dict, data_fingerprint: str, encoder_hash: str = "") -> dict:
    """What must match for a checkpoint to be continued, in the order mismatches are reported."""
    return {"model": model.registry_name, "model_config": asdict(model.config), "loss_config": asdict(model.loss_config),
            "seed": seed, "optimizer": optimizer_settings, "training_data": data_fingerprint,
            "encoder": encoder_hash, "fields": [asdict(f) for f in model.fields]}


def first_difference(saved: dict, current: dict) -> str | None:
    for key, value in current.items():
        if json.dumps(saved.get(key), sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            return key
    return None


def remove_checkpoint(checkpoint_dir: str | None) -> None:
    """Remove a finished run's checkpoint, the staging of checkpoint writes whose process was killed mid-write,
    and the directory when nothing else is in it."""
    if not checkpoint_dir:
        return
    path = os.path.join(checkpoint_dir, CHECKPOINT_FILE)
    if os.path.exists(path):
        os.remove(path)
    remove_stale_staging(path)
    if os.path.isdir(checkpoint_dir) and not os.listdir(checkpoint_dir):
        os.rmdir(checkpoint_dir)


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
                    best_state: dict[str, torch.Tensor] | None, identity: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"model": cpu_state(model), "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
             "best_model": best_state, "progress": json.dumps(asdict(progress)),
             "identity": json.dumps(identity, default=str)}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, identity: dict
                    ) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and RNG from ``path`` after checking it was written by the same run
    (``identity``); return the progress and the best state so far."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointMismatch(f"{path}: cannot read checkpoint ({first_line}); remove it or drop --resume") from None
    saved = json.loads(state.get("identity") or "{}") if isinstance(state, dict) else {}
    differing = first_difference(saved, identity) if saved else "identity (written by an older apem)"
    if differing:
        raise CheckpointMismatch(f"{path}: checkpoint belongs to another run ({differing} differs); "
                                 "remove it, use another --out, or drop --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    return Progress(**json.loads(state["progress"])), state["best_model"]
