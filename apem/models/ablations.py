"""APEM's ablations (paper sec. 4.3): APEM's own code under config or loss overrides.

- ``apem_wo_asrg``: plain stacked self-attention instead of the selector and inducing points.
- ``apem_wo_ps``: a task-agnostic mean instead of the task indicators' attention (eq. 18).
- ``apem_wo_ld``: no sequential-dependence term L_D (eq. 21's sigma = 0).
"""

from apem.models.apem_model import APEM
from apem.models.registry import register_model

register_model("apem_wo_asrg", dynamic_activation=False)(APEM)
register_model("apem_wo_ps", task_indicators=False)(APEM)
register_model("apem_wo_ld", loss={"dependence_weights": 0.0})(APEM)
