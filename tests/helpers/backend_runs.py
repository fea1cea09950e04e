"""The body of each tests/methods module's ``_runs`` guard (evaluated at collection by tests/methods/conftest.py,
and again when the test runs)."""

from __future__ import annotations

from typing import Any

import pytest

from fastmerge import backends
from fastmerge.backends.base import MergeJob


def skip_unless_runs(backend: str, method: Any, params: Any, compat: bool = False) -> None:
    """Skip unless ``backend`` can run ``method`` (a MergeMethod) with ``params`` on the CPU: its
    ``not_supported_reasons`` name why not."""
    reasons = backends.BACKENDS[backend].not_supported_reasons(MergeJob("<tensor>", method, params, compat), "cpu")
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
