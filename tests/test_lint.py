"""`ruff check` and `ruff format --check` are part of the suite, so CI enforces them."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff comes with the test extra: pip install -e '.[test]'"
    result = subprocess.run([ruff, *command, "sdbatch", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
