"""The command line as a well-kept tool: --version, help text and shown defaults on every option,
--quiet, and no TensorFlow import noise on stderr."""

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest

from apem.cli.main import build_parser, main

TF_NOISE = ("cuFFT", "cuDNN", "cuBLAS", "cpu_feature_guard", "oneDNN", "TF-TRT", "absl::", "cuda drivers",
            "Unable to import IPython", "crcmod", "FutureWarning")


def test_version_comes_from_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"apem {metadata.version('apem')}"


def commands(parser, path=()):
    """(command path, parser) for apem and every subcommand at every depth."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_option_of_every_command_has_help_and_shows_its_default():
    found = list(commands(build_parser()))
    assert {("predict",), ("pipeline", "run-local"), ("split",)} <= {path for path, _ in found}
    for path, parser in found:
        formatter = parser.formatter_class(prog=parser.prog)
        assert parser.description, path  # `apem X --help` says what X does
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help, (path, action.option_strings)
            if action.required or action.nargs == 0:
                continue
            shown = formatter._get_help_string(action)  # the help text before argparse fills in %(default)s
            assert "(default" in shown, (path, action.option_strings)
    train_help = " ".join(dict(commands(build_parser()))[("train",)].format_help().split())
    assert "maximum training epochs (default: 10)" in train_help and "(default: none)" in train_help


def test_the_top_level_description_is_whole(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "run the daily retraining pipeline on Kubeflow." in text and "--verbose" in text and "--quiet" in text


def test_quiet_prints_nothing_on_success_and_the_default_logs_to_stderr(tmp_path, capsys):
    assert main(["--quiet", "pipeline", "compile", "--out", str(tmp_path / "quiet.yaml")]) == 0
    assert capsys.readouterr() == ("", "")
    assert os.path.getsize(tmp_path / "quiet.yaml") > 0
    assert main(["pipeline", "compile", "--out", str(tmp_path / "default.yaml")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "default.yaml" in err  # progress goes to stderr, through logging


def test_errors_stay_one_line_even_when_quiet(tmp_path, one_line_error):
    one_line_error(["--quiet", "predict", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path / "data"),
                    "--out", str(tmp_path / "p.parquet")], "nowhere")


@pytest.mark.slow
def test_validate_keeps_tensorflow_import_noise_off_stderr(tmp_path):
    """A real `apem validate` process: TensorFlow's registration lines, notices and warnings stay out."""
    from apem.data.features import default_spec
    from apem.data.spec import write_dataset
    from apem.research.synth import SynthConfig, generate

    write_dataset(generate(SynthConfig(rows=1500, days=3, seed=1))[0], default_spec(), str(tmp_path / "data"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "GRPC_"))}
    done = subprocess.run([sys.executable, "-m", "apem.cli.main", "validate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not [word for word in TF_NOISE if word in done.stderr], done.stderr
    assert re.fullmatch(r"no anomalies; report \S+anomalies.md, stats \S+stats.pb\s*", done.stderr), done.stderr
    assert done.stdout == ""
