"""split: chronological train/val/test on whole days, negative downsampling of train only (Beam)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from apem_kfp.components import APEM_IMAGE


@dsl.component(base_image=APEM_IMAGE, install_kfp_package=False)
def split(
    dataset: Input[Dataset],
    negative_rate: float,
    split_ratios: str,
    beam_runner: str,
    beam_args: str,
    splits: Output[Dataset],
    metrics: Output[Metrics],
):
    """Split ``dataset`` by event day into ``splits/train``, ``splits/val`` and ``splits/test``
    (``split_ratios`` like ``"8,1,1"``), keeping first-step negatives of train with rate
    ``negative_rate``; ``splits/split.json`` records the boundaries and the rate (used to
    recalibrate). ``beam_runner``/``beam_args`` (space-separated Beam options) choose where Beam
    runs: DirectRunner locally, Dataflow/Flink/Spark on the cluster.
    """
    import json
    import shlex

    from apem.data.split_record import SPLITS
    from apem.dataplane.beam_options import artifact_location
    from apem.dataplane.split import split_dataset

    ratios = tuple(int(part) for part in split_ratios.split(","))
    # remote Beam workers (Dataflow, Flink, Spark) read and write the artifacts' URIs, not the pod's mount
    source, target = (artifact_location(a.path, a.uri, beam_runner) for a in (dataset, splits))
    summary = split_dataset(source, target, negative_rate=negative_rate, ratios=ratios,
                            runner=beam_runner, pipeline_args=shlex.split(beam_args) or None)
    splits.metadata.update({"negative_rate": negative_rate, "ratios": split_ratios})
    for name in SPLITS:
        metrics.log_metric(f"{name}_rows", summary["rows"][name]["after_sampling"])
    metrics.log_metric("negative_rate", negative_rate)
    print(json.dumps(summary, default=str))
