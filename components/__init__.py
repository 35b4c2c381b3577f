"""KFP components of the daily retraining pipeline, one module each, thin wrappers over ``apem``.

Every component runs in the one project image built from the repository's ``Dockerfile``
(``APEM_IMAGE``); nothing is pip-installed at run time (``install_kfp_package=False``: the image
already has the pinned kfp). Each module is also compiled to ``components/<name>.yaml`` by
``python -m apem_kfp.components.compile_components`` so other pipelines can ``load_component_from_file`` it.
"""

IMAGE_REPOSITORY = "ghcr.io/apem-project/apem"
IMAGE_TAG = "0.1.0"  # the project version in pyproject.toml; bump both together
APEM_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"

COMPONENT_NAMES = ("ingest", "validate", "split", "train", "evaluate", "push", "notify", "score")
