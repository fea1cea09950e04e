"""The repository passes ``ruff check`` (rules and line length: ``[tool.ruff]`` in pyproject.toml), so a
green ``pytest`` (= CI) includes the lint."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(REPO)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert r.returncode == 0, f"`ruff check` found problems (exit code {r.returncode}):\n{r.stdout}{r.stderr}"
