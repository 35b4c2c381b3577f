"""Fault injection (issue 11): ``apem train``, ``apem split`` and ``apem pipeline run-local`` are
SIGKILLed at random points, then rerun on the same output until one run completes.

Per command: one complete run first (it measures the command's duration D on this machine and
leaves an earlier output for the next runs to replace), then 5 runs each killed at a delay
drawn from its own span of D (``KILL_SPANS``, from 3 % to 85 %; seeded: the seed is in every failure
message, set APEM_FAULT_SEED to replay), then a last run that must complete. The kill is ``SIGKILL`` of the
command's whole process group (what a container stop or a pod eviction does; a SIGKILL of the
launcher alone is covered for Beam's workers by tests/dataplane/test_beam_workers.py).
After every killed run: no process of the group or of the command's tree survives, the input is
byte-identical, and the output is either absent or a complete output (the earlier one or a new one),
never a partial one. After the last run: no staging left anywhere (``.<name>.<pid>-<x>.tmp``,
``*.tmp-PID``), the input still byte-identical, and the output complete.

Cost: about 3.6 D per command (1 + 1.6 + 1); tiny data keeps D to seconds of imports and a few
seconds of work. Measured on 2 shared cores at load ~2-3 (with .pyc files; without them, under
PYTHONDONTWRITEBYTECODE=1, every subprocess recompiles its imports and it takes 3-4 times longer):
split D 9 s, test 33 s; train D 10 s, test 38 s; run-local D 65 s, test 237 s (311 s in all). ``APEM_SKIP_FAULT_INJECTION=1`` skips it (``make test`` runs it).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from apem.release.push import model_dir_digest as tree_digest  # SHA-256 over relative paths and bytes
from apem.research.synth import SynthConfig, write_synthetic_dataset
from apem_kfp.pipelines.local_runner import ensure_raw_events, paths
from process_tree import descendants, process_table, survivors

SEED = int(os.environ.get("APEM_FAULT_SEED", time.time_ns() % 2**31))
STAGING = re.compile(r"(^\..+\.tmp$)|(\.tmp-\d+$)")
APEM = os.path.join(os.path.dirname(sys.executable), "apem")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("APEM_SKIP_FAULT_INJECTION") == "1", reason="APEM_SKIP_FAULT_INJECTION=1"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def staging_left(root: str) -> list[str]:
    return sorted(os.path.join(folder, name) for folder, dirs, files in os.walk(root)
                  for name in dirs + files if STAGING.search(name))


def run_to_completion(argv: list[str], note: str) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, start_new_session=True)
    # kfp.local prints each task's own output (a failed task's traceback or crash) to stdout
    assert done.returncode == 0, f"{note}: exit {done.returncode}\n{done.stderr[-3000:]}\nstdout:\n{done.stdout[-6000:]}"
    return time.monotonic() - started


def run_and_kill(argv: list[str], delay: float, note: str) -> None:
    """Start ``argv`` in its own process group, SIGKILL the group after ``delay`` s, and check that
    nothing of it survives."""
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)  # finished before the kill point: a complete run, also fine
        return
    except subprocess.TimeoutExpired:
        pass
    tree = descendants(proc.pid, process_table())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert survivors(tree, pgid=proc.pid, timeout=10.0) == {}, f"{note}: orphaned processes"


# One kill point drawn in each of these spans (fractions of the measured duration): spread from the
# start-up to the last quarter, denser early, where they cost less (1.6 D on average in all).
KILL_SPANS = ((0.03, 0.10), (0.10, 0.20), (0.20, 0.35), (0.35, 0.55), (0.55, 0.85))


def kill_delays(duration: float, rng: random.Random) -> list[float]:
    return [round(duration * rng.uniform(low, high), 2) for low, high in KILL_SPANS]


def inject(argv: list[str], inputs: list[str], output_complete, scratch: str, name: str) -> dict:
    """The whole scenario for one command (see the module docstring); returns what it measured."""
    rng = random.Random(f"{SEED}-{name}")
    before = {path: tree_digest(path) for path in inputs}
    duration = run_to_completion(argv, f"{name} first run (seed {SEED})")
    delays = kill_delays(duration, rng)
    for delay in delays:
        note = f"{name} killed at {delay}s of {duration:.1f}s (seed {SEED}, delays {delays})"
        run_and_kill(argv, delay, note)
        assert {path: tree_digest(path) for path in inputs} == before, f"{note}: input changed"
        assert output_complete(), f"{note}: partial output"
    run_to_completion(argv, f"{name} rerun after the kills (seed {SEED}, delays {delays})")
    assert staging_left(scratch) == [], f"{name}: staging left (seed {SEED}, delays {delays})"
    assert {path: tree_digest(path) for path in inputs} == before, f"{name}: input changed (seed {SEED})"
    assert output_complete(), f"{name}: output incomplete after the rerun (seed {SEED})"
    measured = {"command": name, "seconds": round(duration, 1), "delays": delays, "seed": SEED}
    print(json.dumps(measured))  # shown with -rA; also a junit property
    return measured


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_synthetic_dataset(SynthConfig(rows=3000, days=6, seed=5), str(root / "data"))
    return root


def split_complete(out: str) -> bool:
    if not os.path.exists(out):
        return True
    return os.path.isfile(os.path.join(out, "split.json")) and all(
        os.path.isfile(os.path.join(out, part, "_SUCCESS")) for part in ("train", "val", "test"))


def test_split_killed_anywhere_then_rerun(dataset, record_property):
    data, out = str(dataset / "data"), str(dataset / "split")
    argv = [APEM, "split", "--data", data, "--out", out, "--neg-rate", "0.5", "--direct_num_workers=1"]
    record_property("faults", inject(argv, [data], lambda: split_complete(out), str(dataset), "apem split"))


def test_train_killed_anywhere_then_rerun(dataset, record_property):
    splits = str(dataset / "split")
    if not split_complete(splits) or not os.path.exists(splits):
        subprocess.run([APEM, "split", "--data", str(dataset / "data"), "--out", splits,
                        "--direct_running_mode=in_memory"], check=True, capture_output=True, timeout=600)
    out = str(dataset / "model")
    argv = [APEM, "train", "--train", f"{splits}/train", "--val", f"{splits}/val", "--model", "esmm", "--out", out,
            "--epochs", "2", "--batch-size", "256", "--threads", "1"]

    def model_complete():
        return not os.path.exists(out) or all(
            os.path.isfile(os.path.join(out, f)) for f in ("config.json", "features.json", "weights.pt"))

    record_property("faults", inject(argv, [splits], model_complete, str(dataset), "apem train"))


def test_run_local_killed_anywhere_then_rerun(tmp_path, record_property, monkeypatch):
    temp = tmp_path / "temp"  # the runs' temp dir: what a killed task leaves in it must not pile up there
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    workdir = str(tmp_path / "local")
    where = paths(workdir)
    ensure_raw_events(where["raw"], rows=8000, days=4, seed=0)  # the input; generated once, before any kill
    argv = [APEM, "pipeline", "run-local", "--workdir", workdir, "--rows", "8000", "--days", "4", "--epochs", "1",
            "--model", "esmm", "--model-params", json.dumps({"embed_dim": 4, "tower_hidden": [8]}),
            "--batch-size", "256", "--negative-rate", "0.5", "--param", "bootstrap_resamples=20",
            "--param", "alpha=0.5", "--param", "beam_args=--direct_running_mode=in_memory --direct_num_workers=1"]

    def champion_complete():
        pointer = os.path.join(where["serving"], "champion.json")
        if not os.path.exists(pointer):
            return True
        with open(pointer) as fh:
            served = json.load(fh)["model_dir"]
        return os.path.isfile(os.path.join(served, "config.json"))

    record_property("faults", inject(argv, [where["raw"]], champion_complete, workdir, "apem pipeline run-local"))
    # the tasks' scratch (validate's baseline copy, train's checkpoints, evaluate's champion copy): a killed run's is
    # removed by the next run of the same task (atomic.scratch_dir)
    scratch = ("apem-baseline", "apem-checkpoints", "apem-champion")
    left = [name for name in os.listdir(temp) if any(kind in name for kind in scratch)]
    assert left == [], f"scratch left (seed {SEED})"
