"""One file per model; importing this package registers them all (see :mod:`apem.models.registry`).

The import order is the order of :func:`apem.models.registry.list_models`: APEM, then the paper's
baselines (sec. 4.1.2), then APEM's ablations (sec. 4.3).
"""

from apem.models import apem_model  # noqa: F401, I001  (the order below is the registry's order)
from apem.models import single_task, shared_bottom, mmoe, ple, aitm, esmm, escm2  # noqa: F401, I001
from apem.models import ablations  # noqa: F401, I001
from apem.models.registry import build_model, list_models

__all__ = ["build_model", "list_models"]
