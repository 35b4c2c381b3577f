"""Model names used by the CLI, the experiment grid and the pipeline, mapped to classes and configs.

Each model module defines one ``MultiTaskModel`` subclass with a ``Config`` dataclass. Ablations are
APEM with config overrides, so they share APEM's code.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, fields as dataclass_fields
from typing import Any

from apem.models.base import FieldSpec, LossConfig, MultiTaskModel

# name -> ("module:Class", config overrides, loss overrides)
MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "apem": ("apem.models.apem:APEM", {}, {}),
    "single_task": ("apem.models.single_task:SingleTask", {}, {}),
    "shared_bottom": ("apem.models.shared_bottom:SharedBottom", {}, {}),
    "mmoe": ("apem.models.mmoe:MMoE", {}, {}),
    "ple": ("apem.models.ple:PLE", {}, {}),
    "aitm": ("apem.models.aitm:AITM", {}, {}),
    "esmm": ("apem.models.esmm:ESMM", {}, {}),
    "escm2_ips": ("apem.models.escm2:ESCM2", {"variant": "ips"}, {}),
    "escm2_dr": ("apem.models.escm2:ESCM2", {"variant": "dr"}, {}),
    "apem_wo_asrg": ("apem.models.apem:APEM", {"dynamic_activation": False}, {}),
    "apem_wo_ps": ("apem.models.apem:APEM", {"task_indicators": False}, {}),
    "apem_wo_ld": ("apem.models.apem:APEM", {}, {"dependence_weights": 0.0}),
}


def model_names() -> list[str]:
    return list(MODELS)


def model_class(name: str) -> type[MultiTaskModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    module_name, class_name = MODELS[name][0].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def _typed(config_cls: type, values: dict[str, Any], what: str):
    known = {f.name for f in dataclass_fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return config_cls(**values)


def resolve_configs(name: str, overrides: dict[str, Any] | None = None,
                    loss_overrides: dict[str, Any] | None = None) -> tuple[Any, LossConfig]:
    """The model's typed Config and LossConfig: registry defaults, then the caller's overrides."""
    cls = model_class(name)
    _, config_defaults, loss_defaults = MODELS[name]
    config = _typed(cls.Config, {**config_defaults, **(overrides or {})}, f"{name} config")
    loss = _typed(cls.default_loss_config().__class__,
                  {**asdict(cls.default_loss_config()), **loss_defaults, **(loss_overrides or {})}, "loss")
    return config, loss


def build_model(name: str, fields: list[FieldSpec], n_tasks: int, overrides: dict[str, Any] | None = None,
                loss_overrides: dict[str, Any] | None = None) -> MultiTaskModel:
    config, loss = resolve_configs(name, overrides, loss_overrides)
    model = model_class(name)(fields, n_tasks, config, loss)
    model.registry_name = name
    return model
