"""The candidate against the registry's current champion (the alias ``champion``)."""

from __future__ import annotations

from apem.data.atomic import scratch_dir
from apem.eval.blessing import BlessingRule
from apem.eval.comparison import compare_with_champion
from apem.release.mlflow_registry import download_champion


def evaluate_against_registry(candidate_dir: str, test_dir: str, tracking_uri: str, registered_model_name: str,
                              rule: BlessingRule | None = None, bootstrap_resamples: int = 200,
                              seed: int = 0) -> dict:
    """:func:`apem.eval.comparison.compare_with_champion` with the champion resolved from the MLflow
    registry alias ``champion``."""
    with scratch_dir("apem-champion") as tmp:  # a killed evaluate's copy is removed by the next one
        champion = download_champion(tracking_uri, registered_model_name, tmp)
        return compare_with_champion(candidate_dir, test_dir, champion_dir=champion and champion.model_dir,
                        champion_version=champion and champion.version, rule=rule,
                        bootstrap_resamples=bootstrap_resamples, seed=seed)
