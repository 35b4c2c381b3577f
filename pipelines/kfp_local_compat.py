"""Workaround with no public API: teach kfp.local the one placeholder it lacks.

kfp 2.13's local runner resolves only a few pipeline-level placeholders and fails with an
IndexError on ``{{$.pipeline_job_schedule_time_utc}}``, which ingest receives on the cluster. kfp
offers no hook to add a placeholder, so this wraps ``kfp.local.placeholder_utils
.resolve_individual_placeholder`` (a module-level function, not a public API). A local run has no
schedule, so the placeholder resolves to "" (ingest then uses run_date, or yesterday of now), just
as a manual run does. ``tests/pipelines/test_kfp_local_compat.py`` fails loudly when kfp changes:
when it learns the placeholder (drop this module) or renames the function (adapt it).
"""

from __future__ import annotations


def resolve_schedule_time_locally() -> None:
    from kfp import dsl
    from kfp.local import placeholder_utils

    original = placeholder_utils.resolve_individual_placeholder
    if getattr(original, "resolves_schedule_time", False):
        return

    def resolve(element: str, *args, **kwargs) -> str:
        return original(element.replace(dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER, ""), *args, **kwargs)

    resolve.resolves_schedule_time = True
    placeholder_utils.resolve_individual_placeholder = resolve
