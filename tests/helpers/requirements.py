"""A green test run means the native code was built and every test dependency was there.

By default a run *requires* ``fastmerge._C`` (the C++ CPU extension), ``triton`` (its kernels run through
the interpreter on CPU) and ``mergekit`` (the parity suite; ``transformers`` comes with it):

* at session start, anything missing stops the run with one error naming it (``_C``: with
  ``fastmerge._native.LOAD_ERRORS``);
* a test that skips because one of them is missing is reported as a failure.

``FASTMERGE_ALLOW_MISSING=1`` turns both off (such tests skip, as in a partial install). GPU lanes
(``@pytest.mark.gpu``, ``fastmerge._C_cuda`` unusable, no CUDA device) always skip: CI has no GPU.
Used by tests/conftest.py and bench/conftest.py.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re

import pytest

ALLOW_ENV = "FASTMERGE_ALLOW_MISSING"

#: skip reasons that mean "built or installed incompletely" (never "no GPU"): ``fastmerge._C`` with a word
#: boundary does not match ``fastmerge._C_cuda``
MISSING_SKIP = re.compile(
    r"fastmerge\._C\b"
    r"|triton is not installed|needs triton\b|could not import 'triton'"
    r"|mergekit(==[\d.]+)? is not (installed|importable)|could not import 'mergekit'"
    r"|could not import 'transformers'"
)


def required() -> bool:
    return os.environ.get(ALLOW_ENV) != "1"


@functools.lru_cache(maxsize=1)
def missing() -> tuple[str, ...]:
    """One line per missing requirement ([] when everything is there)."""
    from fastmerge import _native

    out = []
    if not _native.HAS_CPU_EXT:
        out.append(f"fastmerge._C (the C++ CPU extension) is not loaded: {_native.LOAD_ERRORS.get('_C', 'unknown')}")
    for mod, why in (
        ("triton", "the Triton kernel tests (interpreted on CPU)"),
        ("mergekit", "the mergekit 0.1.5 parity tests"),
    ):
        try:
            importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken install raising something else
            out.append(f"import {mod} failed ({type(e).__name__}: {e}): needed by {why}")
    # found, not imported (a few seconds): the tests that use it import it and fail if it is broken
    if importlib.util.find_spec("transformers") is None:
        out.append("transformers is not installed: needed by the parity and layer-wise tests (a mergekit dependency)")
    return tuple(out)


def check_session() -> None:
    """Stop the run before any test when a requirement is missing (unless FASTMERGE_ALLOW_MISSING=1)."""
    if not required():
        return
    gone = missing()
    if gone:
        raise pytest.UsageError(
            "fastmerge tests need the native extension and every test dependency, and these are missing:\n  - "
            + "\n  - ".join(gone)
            + "\nInstall with `pip install '.[test]'` (a C++ compiler and CMake >= 3.18 build fastmerge._C), "
            f"or set {ALLOW_ENV}=1 to run what can run and skip the rest (such a run proves less)."
        )


def skip_to_failure(item: pytest.Item, report: pytest.TestReport) -> None:
    """Turn a skip caused by a missing requirement into a failure (unless FASTMERGE_ALLOW_MISSING=1)."""
    if not report.skipped or not required() or "gpu" in item.keywords or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing requirement, which fails the run ({ALLOW_ENV}=1 allows it): {reason}"
