"""Canary for pipelines/kfp_local_compat.py: fails loudly when kfp.local changes under the workaround."""

import pytest
from kfp import dsl
from kfp.local import placeholder_utils

from apem_kfp.pipelines import kfp_local_compat

ARGS = dict(executor_input_dict={"outputs": {"outputFile": "/tmp/out"}}, pipeline_resource_name="p", task_resource_name="t", pipeline_root="/tmp",
            pipeline_job_id="1", pipeline_task_id="2")


def test_kfp_local_still_lacks_the_schedule_time_placeholder() -> None:
    """If this fails, kfp.local learnt the placeholder: delete kfp_local_compat and this test."""
    resolve = placeholder_utils.resolve_individual_placeholder
    if getattr(resolve, "resolves_schedule_time", False):
        pytest.skip("patched earlier in this process")
    with pytest.raises(IndexError):
        resolve(dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER, **ARGS)


def test_the_patch_resolves_the_placeholder_to_empty() -> None:
    kfp_local_compat.resolve_schedule_time_locally()
    kfp_local_compat.resolve_schedule_time_locally()  # idempotent
    patched = placeholder_utils.resolve_individual_placeholder
    assert patched.resolves_schedule_time
    assert patched(f"at {dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER}", **ARGS) == "at "
