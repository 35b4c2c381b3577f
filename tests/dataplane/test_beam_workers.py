"""Canary of apem.dataplane.beam_workers: a SIGKILL of `apem split` alone (not its process group)
takes its Beam workers with it, within seconds instead of the 80 s and more of Beam's own."""

import os
import signal
import subprocess
import sys
import time

import pytest

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
