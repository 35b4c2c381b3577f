"""Where Beam jobs read and write KFP artifacts (remote workers get the artifact's URI, not the pod's mount), and how
a component's process that ran one ends."""

import json
import subprocess
import sys
import textwrap

import pytest

from apem.dataplane.beam_options import artifact_location, end_executor_without_teardown


def test_remote_runners_get_the_artifact_uri_not_the_pods_mount():
    path, uri = "/gcs/bucket/root/split-1/splits", "gs://bucket/root/split-1/splits"
    for runner in ("DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner"):
        assert artifact_location(path, uri, runner) == uri


def test_the_direct_runner_and_local_uris_keep_the_path():
    assert artifact_location("/gcs/b/x", "gs://b/x", "DirectRunner") == "/gcs/b/x"
    # kfp.local: the URI is a local path, which every runner on this machine can read
    assert artifact_location("/tmp/root/x", "/tmp/root/x", "DataflowRunner") == "/tmp/root/x"


COMPONENT = textwrap.dedent("""
    from apem.dataplane.beam_options import end_executor_without_teardown


    def finishes(marker: str):
        with open(marker, "w") as fh:
            fh.write(str(end_executor_without_teardown()))


    def fails(marker: str):
        end_executor_without_teardown()
        raise ValueError("the component failed")
""")


@pytest.mark.parametrize("function", ["finishes", "fails"])
def test_a_component_process_that_ran_beam_ends_after_kfps_executor_with_its_exit_code(tmp_path, function):
    """Under kfp's real executor (python -m kfp.dsl.executor_main, as kfp.local and the cluster run a component), the
    hook applies, the executor still writes the task's outputs after the component returns, and the exit code stays
    the component's: 0, or 1 with the traceback when it raised."""
    module = tmp_path / "component.py"
    module.write_text(COMPONENT)
    marker, output_file = tmp_path / "marker", tmp_path / "executor_output.json"
    executor_input = {"inputs": {"parameterValues": {"marker": str(marker)}},
                      "outputs": {"outputFile": str(output_file)}}
    done = subprocess.run([sys.executable, "-m", "kfp.dsl.executor_main", "--component_module_path", str(module),
                           "--function_to_execute", function, "--executor_input", json.dumps(executor_input)],
                          capture_output=True, text=True, timeout=300)
    if function == "finishes":
        assert done.returncode == 0, done.stderr[-2000:]
        assert marker.read_text() == "True"  # kfp still runs components under the module the hook looks for
        assert output_file.is_file()
    else:
        assert done.returncode == 1
        assert "the component failed" in done.stderr


def test_outside_kfps_executor_the_process_keeps_its_own_exit():
    """pytest (or the apem CLI, or a notebook) is __main__ here: nothing is registered."""
    assert end_executor_without_teardown() is False
