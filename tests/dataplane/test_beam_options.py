"""Where Beam jobs read and write KFP artifacts: remote workers get the artifact's URI, not the pod's mount."""

from apem.dataplane.beam_options import artifact_location


def test_remote_runners_get_the_artifact_uri_not_the_pods_mount():
    path, uri = "/gcs/bucket/root/split-1/splits", "gs://bucket/root/split-1/splits"
    for runner in ("DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner"):
        assert artifact_location(path, uri, runner) == uri


def test_the_direct_runner_and_local_uris_keep_the_path():
    assert artifact_location("/gcs/b/x", "gs://b/x", "DirectRunner") == "/gcs/b/x"
    # kfp.local: the URI is a local path, which every runner on this machine can read
    assert artifact_location("/tmp/root/x", "/tmp/root/x", "DataflowRunner") == "/tmp/root/x"
