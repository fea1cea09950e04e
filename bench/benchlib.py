"""Helpers the bench modules share (not collected: only ``bench_*.py`` files are)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_table(bench_dir: Path, name: str, lines: list[str], payload: dict) -> Path:
    """Write a bench module's results: ``name.md`` (the table, ``lines``) and ``name.json`` (``payload``)."""
    path = bench_dir / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    (bench_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return path


def full_mode(config) -> bool:
    """Full benchmark family only with FASTMERGE_BENCH_FULL=1 and timing on (CI passes --benchmark-disable).
    Here rather than in conftest.py so that a module's ``pytest_generate_tests`` can ask it too."""
    disabled = config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    return os.environ.get("FASTMERGE_BENCH_FULL") == "1" and not disabled
