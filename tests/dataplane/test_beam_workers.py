"""Canary of apem.dataplane.beam_workers: a SIGKILL of `apem split` alone (not its process group)
takes its Beam workers with it, within seconds instead of the 80 s and more of Beam's own; and a job in a
DirectRunner mode of the options' choosing runs on Beam's FnApiRunner without the DirectRunner's Prism attempt."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from apem.dataplane.beam_options import beam_pipeline
from apem.research.synth import SynthConfig, write_synthetic_dataset
from process_tree import descendants, process_table, survivors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def wait_for_workers(proc, count, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        table = process_table()
        workers = {p for p in descendants(proc.pid, table) if "apem.dataplane.beam_workers" in table[p]["cmdline"]}
        if len(workers) >= count:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"no {count} Beam workers within {timeout}s")


def test_workers_die_with_a_killed_split(tmp_path):
    data = str(tmp_path / "data")
    write_synthetic_dataset(SynthConfig(rows=3000, days=6, seed=1), data)
    apem = os.path.join(os.path.dirname(sys.executable), "apem")
    proc = subprocess.Popen([apem, "split", "--data", data, "--out", str(tmp_path / "out"), "--direct_num_workers=2"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_workers(proc, 2)
        # direct children of the launcher (exec, no shell in between), so the kernel's parent-death signal applies
        assert all(process_table()[w]["ppid"] == proc.pid for w in workers)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: the hard case
        proc.wait()
        assert survivors(workers, timeout=5.0) == {}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()


@pytest.mark.parametrize("mode", ["in_memory", "multi_threading"])
def test_a_direct_runner_job_skips_prism(mode, caplog, tmp_path):
    """Beam's DirectRunner would first try Prism, which downloads a binary at run time and left a gRPC thread
    that aborted the process at exit; the job runs (and counts right) with no Prism attempt logged."""
    import apache_beam as beam

    caplog.set_level(logging.INFO)
    out = str(tmp_path / "squares")
    with beam_pipeline("DirectRunner", [f"--direct_running_mode={mode}"]) as pipeline:
        _ = (pipeline | beam.Create(range(10)) | beam.Map(lambda v: v * v) | beam.CombineGlobally(sum)
             | beam.io.WriteToText(out, shard_name_template=""))
    with open(out) as fh:
        assert fh.read().strip() == "285"
    assert not [r.getMessage() for r in caplog.records if "prism" in r.getMessage().lower()]
