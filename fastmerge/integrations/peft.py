"""PEFT's merge functions replaced by fastmerge's: ``enable()`` / ``disable()`` / ``enabled()`` / ``patched()``.

``enable()`` replaces the five public merge functions of ``peft.utils.merge_utils`` (``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) with ``fastmerge.lora.merge_utils``'s (same
signatures), both in ``peft.utils.merge_utils`` and in every loaded ``peft`` module that imported one of them
by name (``peft.tuners.lora.model`` does, for ``LoraModel.add_weighted_adapter``): any ``peft.*`` module
attribute that *is* one of PEFT's original function objects is swapped. ``disable()`` puts the exact original
objects back wherever a replacement is found. Both are idempotent (enable twice, disable once: restored);
``patched()`` is a context manager that enables and afterwards returns to the previous state.

What runs: the torch implementations of ``fastmerge.lora.merge_utils``, which give PEFT's results bit for bit
(exactly-k ``topk`` pruning, the sign election on the unweighted pruned tensors, the disjoint mean over an
unweighted count; tested in tests/lora/test_peft_integration.py), with fewer full-size temporaries (weights
applied while summing, the sign mask computed once). DARE (``dare_linear``, ``dare_ties``) draws its masks
as PEFT does (``torch.bernoulli`` on torch's global generator, in the same order), so a seed gives PEFT's
masks and PEFT's result. fastmerge's fused native kernels are *not* used: they round differently from
PEFT (``_native.weighted_delta_sum`` accumulates ``w_i·x_i`` in one fp32 pass, which differs from torch's
``(stack * w).sum(0)`` in the last bit on most elements) or have other semantics (``_native.ties`` elects the
sign on weighted deltas and normalises by the weights), so they could not be shown equal to PEFT.

``LoraModel.add_weighted_adapter`` itself is not patched: it benefits through the patched names it calls
(``linear``, ``ties``, ``dare_*``, ``magnitude_prune`` and their ``*_svd`` variants' merge step). Its SVD
(``*_svd``, ``svd``) stays PEFT's ``torch.linalg.svd``; fastmerge's randomized SVD is used by
``fastmerge.lora.merge_adapters`` (adapter files, no model) instead.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Iterator

from ..lora import merge_utils as _fast

#: the names replaced in ``peft.utils.merge_utils`` and wherever a ``peft`` module imported them
NAMES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: modules known to import the names (imported by ``enable()`` so that their bindings are patched)
KNOWN_IMPORTERS = ("peft.tuners.lora.model",)

_lock = threading.RLock()
_originals: dict[str, Callable[..., Any]] = {}  # name -> PEFT's function object (filled on first enable())
_patched: list[tuple[ModuleType, str]] = []  # (module, attribute) bindings replaced by enable()
_enabled = False


def _replacement(name: str) -> Callable[..., Any]:
    return getattr(_fast, name)


def _peft_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items()) if isinstance(m, ModuleType) and (n == "peft" or n.startswith("peft."))]


def _load_peft() -> ModuleType:
    try:
        mu = importlib.import_module("peft.utils.merge_utils")
        for name in KNOWN_IMPORTERS:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"fastmerge.integrations.peft needs peft (pip install peft): {e}") from e
    return mu


def enabled() -> bool:
    """True while ``enable()`` is in effect."""
    return _enabled


def enable() -> None:
    """Make PEFT's merge functions fastmerge's (see the module docstring); a no-op when already enabled."""
    global _enabled
    with _lock:
        if _enabled:
            return
        mu = _load_peft()
        if not _originals:
            _originals.update({n: getattr(mu, n) for n in NAMES})
        by_id = {id(f): n for n, f in _originals.items()}
        _patched.clear()
        for mod in _peft_modules():
            for attr, val in list(vars(mod).items()):
                name = by_id.get(id(val))
                if name is not None and val is _originals[name]:
                    setattr(mod, attr, _replacement(name))
                    _patched.append((mod, attr))
        _enabled = True


def disable() -> None:
    """Put PEFT's original function objects back everywhere ``enable()`` (or a later import while enabled)
    bound fastmerge's; a no-op when not enabled."""
    global _enabled
    with _lock:
        if not _enabled:
            return
        fast = {id(_replacement(n)): n for n in NAMES}
        for mod, attr in _patched:
            name = fast.get(id(getattr(mod, attr, None)))
            if name is not None:
                setattr(mod, attr, _originals[name])
        # peft modules imported while enabled bound the replacements from merge_utils: restore those too
        for mod in _peft_modules():
            for attr, val in list(vars(mod).items()):
                name = fast.get(id(val))
                if name is not None and val is _replacement(name):
                    setattr(mod, attr, _originals[name])
        _patched.clear()
        _enabled = False


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``with patched(): ...`` runs the block with ``enable()`` in effect, then returns to the previous state."""
    was = enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


def originals() -> dict[str, Callable[..., Any]]:
    """PEFT's original functions by name (after the first ``enable()``; empty before)."""
    return dict(_originals)


__all__ = ["KNOWN_IMPORTERS", "NAMES", "disable", "enable", "enabled", "originals", "patched"]
