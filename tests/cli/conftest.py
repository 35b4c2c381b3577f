"""``one_line_error``: run ``apem`` in-process and check the failure contract of issue 11: exit code
2, one line on stderr naming what went wrong, no traceback."""

import pytest

from apem.cli.main import main


@pytest.fixture
def one_line_error(capsys):
    def check(argv, *fragments):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, err
        return err

    return check
