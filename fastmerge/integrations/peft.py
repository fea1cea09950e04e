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
masks and PEFT's result. fastmerge's mergekit kernels are *not* used: they round differently from PEFT
(``_native.weighted_delta_sum`` accumulates ``w_i·x_i`` in one fp32 pass) or have other semantics
(``_native.ties`` elects the sign on weighted deltas and normalises by the weights). On contiguous CPU
tensors the merge step runs in a kernel written for PEFT's semantics instead (``_native.peft_merge``: the sign
election, the disjoint mean and the weighted sums in torch's own summation order, on the K tensors without
stacking them), bit-identical to the torch code (tests/lora/test_peft_native.py).

Magnitude pruning (``ties``, ``magnitude_prune`` and their ``*_svd`` forms) finds the k-th largest |x| by
selection (the native radix select) instead of PEFT's ``topk`` sort, and falls back to ``topk`` unless exactly
k elements pass, so the kept set is PEFT's.

``enable()`` also replaces the method ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` (the
``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` combinations of
``add_weighted_adapter``; same signature, same (A, B) result layout) with ``svd_weighted_adapter``:

- ``svd``: Σ w_i·s_i·B_i·A_i truncated exactly from the factors (``lora.adapters.svd_from_factors``: QR of
  the stacked factors, SVD of the Σr×Σr core), never the dense ΔW nor its full SVD. Equal to PEFT's result
  up to rounding (and the signs of singular vectors).
- the dense types: PEFT's ΔW_i (``get_delta_weight``) and merge step (the functions above, PEFT's results),
  then the rank-``new_rank`` SVD by ``ops.krylov_svd`` (block Krylov) instead of a full ``torch.linalg.svd``
  of every ΔW: within 1.02× of the full SVD's truncation error (tests/lora/test_peft_integration.py).
- Conv layers, DoRA adapters, and matrices too small for a sketch to pay run PEFT's own method
  unchanged; ``svd_full_matrices`` and ``svd_driver`` only matter there.
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
#: (module, class, method) replaced by ``svd_weighted_adapter`` (skipped where a PEFT version lacks it)
SVD_METHOD = ("peft.tuners.lora.model", "LoraModel", "_svd_generalized_task_arithmetic_weighted_adapter")

_lock = threading.RLock()
_originals: dict[str, Callable[..., Any]] = {}  # name -> PEFT's function object (filled on first enable())
_patched: list[tuple[ModuleType, str]] = []  # (module, attribute) bindings replaced by enable()
_method_original: list[Any] = []  # [PEFT's method] once enable() replaced it
_enabled = False


def _lora_factors(target: Any, adapter: str) -> tuple[Any, Any] | None:
    """(A, B) of ``adapter`` in a LoRA layer (Linear or Embedding), or None when it has none there."""
    if adapter in target.lora_A:
        return target.lora_A[adapter].weight, target.lora_B[adapter].weight
    if adapter in getattr(target, "lora_embedding_A", {}):
        return target.lora_embedding_A[adapter], target.lora_embedding_B[adapter]
    return None


def svd_weighted_adapter(self: Any, combination_type: str, adapters: Any, weights: Any, new_rank: int, target: Any,
                         target_lora_A: Any, target_lora_B: Any, density: Any, majority_sign_method: Any, clamp: Any = None,
                         full_matrices: bool = True, driver: Any = None) -> tuple[Any, Any]:
    """``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` with fastmerge's SVDs (module docstring):
    returns (A, B) = (Vᵀ, U·S) of rank ``new_rank`` as PEFT does."""
    import torch

    from ..lora.adapters import svd_from_factors
    from ..ops.krylov_svd import krylov_plan, krylov_svd

    def peft_own() -> tuple[Any, Any]:
        return _method_original[0](self, combination_type, adapters, weights, new_rank, target, target_lora_A,
                                   target_lora_B, density, majority_sign_method, clamp, full_matrices=full_matrices,
                                   driver=driver)

    valid = [(a, w) for a, w in zip(adapters, weights) if _lora_factors(target, a) is not None]
    shape = tuple(target_lora_B.shape[:1]) + tuple(target_lora_A.shape[1:])
    if (not valid or combination_type not in _fast.FUNCTIONS or target_lora_A.dim() != 2
            or any(getattr(target, "use_dora", {}).get(a, False) for a, _ in valid)
            or (combination_type != "svd" and krylov_plan(new_rank, shape) is None)):
        return peft_own()  # conv, DoRA, no adapter (PEFT's error), or a dense ΔW too small for a sketch: PEFT's own
    if combination_type == "svd":
        bs, as_ = [], []
        for a, w in valid:
            fa, fb = _lora_factors(target, a)
            as_.append(fa.detach().float() * (float(w) * target.scaling[a]))
            bs.append(fb.detach().float())
        b, a = svd_from_factors(bs, as_, new_rank)
        dtype = target_lora_A.dtype
    else:
        deltas = [target.get_delta_weight(a) for a, _ in valid]
        ws = torch.tensor([w for _, w in valid]).to(deltas[0].device)
        fn = _fast.FUNCTIONS[combination_type]
        # the *_svd types truncate the merged ΔW approximately anyway: ties at a magnitude threshold are cut by index
        # order rather than by topk's full sort (the same magnitudes kept; merge_utils.magnitude_based_pruning)
        if combination_type == "ties_svd":
            d = _fast.ties_index_ties(deltas, ws, density, majority_sign_method)
        elif combination_type == "dare_ties_svd":
            d = fn(deltas, ws, density, majority_sign_method)
        elif combination_type == "magnitude_prune_svd":
            d = _fast.magnitude_prune_index_ties(deltas, ws, density)
        else:
            d = fn(deltas, ws, density)
        if getattr(target, "fan_in_fan_out", False) or any(a in getattr(target, "lora_embedding_A", {}) for a in adapters):
            d = d.T
        dtype = d.dtype
        u, sv, v, _ = krylov_svd(d.contiguous(), new_rank)
        b, a = u * sv.unsqueeze(-2), v.mT
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def _replacement(name: str) -> Callable[..., Any]:
    return getattr(_fast, name)


def _peft_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items()) if isinstance(m, ModuleType) and (n == "peft" or n.startswith("peft."))]


def _svd_owner() -> Any:
    """The class whose SVD method ``enable()`` replaces, or None for a PEFT version without it."""
    mod = sys.modules.get(SVD_METHOD[0])
    cls = getattr(mod, SVD_METHOD[1], None) if mod is not None else None
    return cls if cls is not None and SVD_METHOD[2] in vars(cls) else None


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
        owner = _svd_owner()
        if owner is not None:
            _method_original[:] = [vars(owner)[SVD_METHOD[2]]]
            setattr(owner, SVD_METHOD[2], svd_weighted_adapter)
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
        owner = _svd_owner()
        if owner is not None and _method_original and vars(owner)[SVD_METHOD[2]] is svd_weighted_adapter:
            setattr(owner, SVD_METHOD[2], _method_original[0])
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


__all__ = ["KNOWN_IMPORTERS", "NAMES", "SVD_METHOD", "disable", "enable", "enabled", "originals", "patched",
           "svd_weighted_adapter"]
