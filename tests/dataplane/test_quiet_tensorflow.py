"""Canary of the TFDV import workaround (``apem.dataplane.quiet_tensorflow``)."""

import importlib.util
import io
import logging

from apem.dataplane import quiet_tensorflow


def test_tfdv_still_writes_its_ipython_notice_to_stderr():
    """When this fails, TFDV no longer prints the notice: drop the stderr filter."""
    package = importlib.util.find_spec("tensorflow_data_validation").submodule_search_locations[0]  # not imported
    with open(f"{package}/utils/display_util.py") as fh:
        source = fh.read()
    assert quiet_tensorflow.TFDV_IPYTHON_NOTICE in source and "sys.stderr.write" in source


def test_the_filter_drops_only_the_notice(caplog):
    real = io.StringIO()
    filtered = quiet_tensorflow._WithoutNotice(real)
    with caplog.at_level(logging.DEBUG, logger="apem.dataplane.quiet_tensorflow"):
        filtered.write("Unable to import IPython: No module named 'IPython'. \nTFDV visualization APIs ...\n")
        filtered.write("a real problem\n")
    assert real.getvalue() == "a real problem\n" and "Unable to import IPython" in caplog.text


def test_quiet_environment_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    quiet_tensorflow.quiet_environment()
    import os

    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["GRPC_VERBOSITY"] == "ERROR"


def test_closing_the_filter_leaves_the_stream_open():
    """Handlers created during TFDV's import hold the filter as their stream; closing them (as
    logging.shutdown() does) must not close the real stderr."""
    real = io.StringIO()
    filtered = quiet_tensorflow._WithoutNotice(real)
    filtered.write("kept\n")
    filtered.close()
    assert not real.closed and real.getvalue() == "kept\n"
