"""Per-run report folders and the atomic ``latest.json`` pointer."""

import os

from apem.release import reports


def test_each_run_has_its_folder_and_latest_names_the_newest(tmp_path):
    root = str(tmp_path / "output")
    assert reports.read_latest(root) is None
    first = reports.point_latest(root, "2026-01-06", "run-a")
    second = reports.point_latest(root, "2026-01-06", "run-b")
    assert first["report_dir"] == os.path.join(root, "reports", "2026-01-06", "run-a")
    assert second["report_dir"] != first["report_dir"] and reports.read_latest(root) == second
    # replaced atomically: no staging sibling is left beside the pointer
    assert os.listdir(os.path.join(root, "reports")) == [reports.LATEST_POINTER]


def test_run_ids_become_one_safe_path_segment(tmp_path):
    assert reports.safe_run_id("0f1e-22") == "0f1e-22"
    assert reports.safe_run_id("{{$.pipeline_job_uuid}}") == "pipeline_job_uuid"
    assert reports.safe_run_id("../../etc") == "etc" and reports.safe_run_id("") == "unknown-run"
    assert reports.run_report_dir("gs://b/out", "", "r/1") == "gs://b/out/reports/undated/r_1"


def test_run_reports_are_written_then_pointed_at(tmp_path):
    root = str(tmp_path / "output")
    folder = reports.write_run_reports(root, "2026-01-06", "run-c", {"push.md": b"# Push", "push.json": b"{}"})
    assert sorted(os.listdir(folder)) == ["push.json", "push.md"]
    assert reports.read_latest(root)["report_dir"] == folder
