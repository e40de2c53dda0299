"""The tree passes `ruff check` and `ruff format --check` (settings in pyproject.toml), so CI, which runs only the
test command, enforces lint and format."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' brings it")
    res = subprocess.run(
        [ruff, "check", "--no-cache", "src", "tests", "tools"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' brings it")
    res = subprocess.run(
        [ruff, "format", "--check", "--no-cache", "src", "tests", "tools"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, "run `ruff format src tests tools`:\n" + res.stdout + res.stderr
