"""Workaround with no public API: Beam's GCS client against a GCS emulator, without credentials.

Against an emulator (``STORAGE_EMULATOR_HOST``, as :mod:`apem.data.storage` honours it) there are
no credentials to find, and Beam's ``GcsIO`` always asks ``apache_beam.internal.gcp.auth`` for them
(its ``--no_auth`` option only reaches the Dataflow API client, not ``GcsIO``), costing ~20 s of
retried lookups per pipeline. Beam has no public switch for this, so this marks its credential
cache as resolved to None; ``GcsIO`` then builds an anonymous client, which google-cloud-storage
points at the emulator. Only ever active with ``STORAGE_EMULATOR_HOST`` set (tests, local runs).
``tests/dataplane/test_beam_gcs_emulator.py`` fails loudly when Beam changes these internals.
"""

from __future__ import annotations

import os


def anonymous_gcs_for_emulator() -> bool:
    """True when an emulator is configured and Beam now skips its credential lookup."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return False
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials_init = True
        auth._Credentials._credentials = None
    return True
