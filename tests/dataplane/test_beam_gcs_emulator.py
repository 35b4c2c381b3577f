"""Canary for apem/dataplane/beam_gcs_emulator.py: fails loudly when Beam's credential cache changes."""

from apache_beam.internal.gcp import auth
from apache_beam.options.pipeline_options import PipelineOptions

from apem.dataplane.beam_gcs_emulator import anonymous_gcs_for_emulator


def test_beam_still_has_the_credential_cache_we_set() -> None:
    for name in ("_credentials_lock", "_credentials_init", "_credentials"):
        assert hasattr(auth._Credentials, name), f"Beam changed auth._Credentials: {name} is gone"


def test_only_active_with_an_emulator(monkeypatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert anonymous_gcs_for_emulator() is False
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    assert anonymous_gcs_for_emulator() is True
    assert auth.get_service_credentials(PipelineOptions([])) is None  # GcsIO then builds an anonymous client
