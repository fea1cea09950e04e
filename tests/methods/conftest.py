"""Backend x method combinations a backend cannot run (``Backend.not_supported_reasons``: no C++ kernel for
the method, mergekit_compat on the native backend, ...) are not collected, rather than collected and skipped:
several hundred such skips would hide a skip that matters. A test module declares which of its tests depend on
the backend by calling its ``_runs(backend, ...)`` guard (whose arguments are named after the test's
parameters); the guard is evaluated here with the test's parameters, and again when the test runs."""

from __future__ import annotations

import inspect

import pytest


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        runs = getattr(getattr(item, "module", None), "_runs", None)
        cs = getattr(item, "callspec", None)
        fn = getattr(item, "function", None)
        if runs is None or cs is None or fn is None or "_runs" not in fn.__code__.co_names:
            keep.append(item)
            continue
        sig = inspect.signature(runs)
        args = {k: cs.params[k] for k in sig.parameters if k in cs.params}
        missing = [k for k, p in sig.parameters.items() if k not in args and p.default is inspect.Parameter.empty]
        if missing:  # not decidable from the parameters: the test's own call decides
            keep.append(item)
            continue
        try:
            runs(**args)
        except pytest.skip.Exception:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
