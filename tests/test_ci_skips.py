"""SGFAST_NO_SKIP=1 (what CI sets) turns every skip into a failure, at run time and at import."""
import os
import pathlib
import subprocess
import sys

import pytest

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")
SKIPS = {
    "test_skip_in_a_test.py": "import pytest\n\ndef test_a():\n    pytest.skip('no browser')\n",
    "test_skip_at_import.py": "import pytest\n\npytest.importorskip('no_such_module_here')\n\ndef test_b():\n    pass\n",
}


def run_pytest(folder, no_skip):
    env = dict(os.environ, SGFAST_NO_SKIP=no_skip)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-c", os.devnull, "--rootdir", str(folder), str(folder)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    for name, text in SKIPS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_skips_fail_under_no_skip(folder):
    result = run_pytest(folder, "1")
    assert result.returncode != 0
    assert "1 failed" in result.stdout and "1 error" in result.stdout, result.stdout
    assert "skipped under SGFAST_NO_SKIP=1: Skipped: no browser" in result.stdout


def test_skips_stay_skips_by_default(folder):
    result = run_pytest(folder, "0")
    assert result.returncode == 0 and "2 skipped" in result.stdout, result.stdout


def test_a_bad_value_is_an_error(folder):
    result = run_pytest(folder, "yes")
    assert result.returncode != 0 and "SGFAST_NO_SKIP must be 0 or 1" in result.stdout + result.stderr
