"""The one list of model names (as timm's ``@register_model``): name -> class, config and loss defaults.

Each model module registers its class with :func:`register_model`; a variant (an ablation, ESCM2's
two estimators) registers the same class again under its own name with config or loss overrides,
so variants share their model's code. ``apem.models`` imports every model module, so importing
anything from ``apem.models`` fills the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields as dataclass_fields
from typing import Any, Callable, Sequence, TypeVar

from apem.data.encoding import FieldSpec
from apem.nn.losses import LossConfig

ModelClass = TypeVar("ModelClass", bound=type)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    cls: type
    config_defaults: dict[str, Any]
    loss_defaults: dict[str, Any]


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, loss: dict[str, Any] | None = None, **config: Any) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: register ``cls`` under ``name``, with config (and ``loss``) overrides."""

    def add(cls: ModelClass) -> ModelClass:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = RegisteredModel(name, cls, dict(config), dict(loss or {}))
        return cls

    return add


def list_models() -> list[str]:
    """Every registered name, in registration order (the order of ``apem.models``' imports)."""
    return list(_REGISTRY)


def registered(name: str) -> RegisteredModel:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def model_class(name: str) -> type:
    return registered(name).cls


def _typed(config_cls: type, values: dict[str, Any], what: str):
    known = {f.name for f in dataclass_fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return config_cls(**values)


def resolve_configs(name: str, overrides: dict[str, Any] | None = None,
                    loss_overrides: dict[str, Any] | None = None) -> tuple[Any, LossConfig]:
    """The model's typed Config and LossConfig: registry defaults, then the caller's overrides."""
    entry = registered(name)
    config = _typed(entry.cls.Config, {**entry.config_defaults, **(overrides or {})}, f"{name} config")
    loss_default = entry.cls.default_loss_config()
    loss = _typed(type(loss_default), {**asdict(loss_default), **entry.loss_defaults, **(loss_overrides or {})},
                  "loss")
    return config, loss


def build_model(name: str, fields: Sequence[FieldSpec], n_tasks: int, overrides: dict[str, Any] | None = None,
                loss_overrides: dict[str, Any] | None = None):
    config, loss = resolve_configs(name, overrides, loss_overrides)
    return registered(name).cls(fields, n_tasks, config, loss, registry_name=name)
