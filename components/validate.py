"""validate: TFDV statistics, schema and drift anomalies; stops the run on bad data."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def validate(
    dataset: Input[Dataset],
    output_root: str,
    warn_only: bool,
    statistics: Output[Dataset],
    report: Output[Markdown],
    statistics_html: Output[HTML],
    metrics: Output[Metrics],
    engine: str = "local", beam_runner: str = "DirectRunner", beam_args: str = "",
):
    """Validate ``dataset`` with TFDV against the curated schema committed in the repo, and check
    drift against the previous passing window's statistics, kept at
    ``<output_root>/validation/baseline``. Anomalies fail the task, so the pipeline stops before
    training, unless ``warn_only``. Only a window without anomalies becomes the next run's baseline
    (with ``warn_only`` an anomalous window goes on to training, but never becomes the baseline).
    ``report``: the anomalies (Markdown); ``statistics_html``: TFDV's view of the window against the
    baseline. ``engine``: statistics in memory (``local``) or on Beam (``beam``)."""
    import os
    import shlex
    import shutil

    from apem.data import storage
    from apem.data.atomic import scratch_dir
    from apem.dataplane.beam_options import artifact_location
    from apem.dataplane.validation import (REPORT_FILE, STATS_FILE, ValidationFailed, download_baseline,
                                           statistics_html as html_of, validate_dataset)
    from apem.dataplane.validation_beam import statistics_for

    compute = statistics_for(engine, beam_runner, shlex.split(beam_args))  # None: in memory
    data = artifact_location(dataset.path, dataset.uri, beam_runner)  # remote Beam workers need the URI
    failure = None
    # the baseline's local copy: removed on exit, and, left by a run killed here, by the next validate on this machine
    with scratch_dir("apem-baseline") as scratch:
        baseline_uri, baseline_stats = download_baseline(output_root, scratch)
        try:
            result = validate_dataset(data, out_dir=statistics.path, baseline_stats=baseline_stats,
                                      warn_only=warn_only, statistics=compute)
        except ValidationFailed as err:
            failure = err
        # the report and the HTML are written when validation fails too: they show why
        shutil.copyfile(os.path.join(statistics.path, REPORT_FILE), report.path)
        with open(statistics_html.path, "w") as fh:
            fh.write(html_of(os.path.join(statistics.path, STATS_FILE), baseline_stats))

    statistics.metadata["baseline"] = baseline_uri if baseline_stats else ""
    if failure is not None:
        raise failure
    metrics.log_metric("anomalies", len(result["anomalies"]))
    metrics.log_metric("examples", result["examples"])
    metrics.log_metric("drifted_features", sum(1 for d in result["drift"].values() if d.get("drifted")))
    passed = not result["anomalies"]
    statistics.metadata["became_baseline"] = bool(baseline_uri) and passed
    if baseline_uri and passed:
        storage.copy_tree(statistics.path, baseline_uri)
