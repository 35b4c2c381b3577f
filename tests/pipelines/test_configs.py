"""configs.py: the prod environment's Dataflow options, read by Beam's own PipelineOptions."""

import json
import shlex

from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, StandardOptions,
                                                  WorkerOptions)

from apem_kfp.components import APEM_IMAGE
from apem_kfp.pipelines import configs


def test_prod_split_runs_on_dataflow_with_the_component_image():
    prod = configs.environment_parameters("prod")
    flags = shlex.split(prod["beam_args"])
    options = PipelineOptions(flags + [f"--runner={prod['beam_runner']}"])
    # every flag is one Beam knows: nothing silently ignored
    assert not [f for f in flags if f.split("=")[0].lstrip("-") not in options.get_all_options()]
    cloud = options.view_as(GoogleCloudOptions)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert (cloud.project, cloud.region) == ("apem-prod", "europe-west4")
    assert cloud.temp_location.startswith("gs://apem-prod-") and cloud.staging_location.startswith("gs://apem-prod-")
    assert cloud.service_account_email.endswith("@apem-prod.iam.gserviceaccount.com")
    # the workers run the image the components run in, so they have apem (no --setup_file needed)
    assert options.view_as(WorkerOptions).sdk_container_image == APEM_IMAGE


def test_unknown_environment_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown environment 'staging'; known: dev, prod"):
        configs.environment_parameters("staging")


def test_prod_model_params_are_valid_training_settings():
    from apem.train.from_dirs import split_training_params

    overrides, training = split_training_params(json.loads(configs.environment_parameters("prod")["model_params"]))
    assert overrides == {} and training == {"data_loading": "auto", "loader_workers": 3}
