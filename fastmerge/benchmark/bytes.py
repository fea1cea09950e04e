"""The physical-minimum byte rule: how many bytes a method *must* move to merge one tensor.

A kernel's GB/s is these bytes divided by its time, so a kernel that reads its inputs more often than it
must is not rewarded for it: the figure says how close the method, not one implementation of it, runs to
the memory limit. The rule, for one output tensor of ``n`` elements merged from ``T`` non-base inputs:

    bytes = passes × (Σ the input tensors the method reads, base included where it reads it) + the output once

``passes`` is the number of times every input must be read when a tensor does not fit in the last-level
cache: one pass for the merge itself, plus one pass for each whole-tensor quantity (a k-th largest
magnitude, an L1 norm, a dot product) that every output element depends on and that must therefore be
known before the first output element is written. Quantities over one row (a few KB, in cache) cost no
pass. The base counts as one more input for every method whose ``base_policy`` is not ``"ignored"``.

Per-method knowledge is data (``RULES``, keyed by ``MergeMethod.name``): a rule's ``words`` say it in
prose (printed by ``fastmerge bench kernels`` and stored in its JSON) and ``passes(params)`` gives the
count for one set of parameters (``None``: not a bandwidth-bound method, no GB/s reported). A new method
adds one entry; ``tests/benchmark/test_bytes.py`` fails while a registered method has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..methods import MergeMethod


#: the rule in one line (printed above every table and stored in the JSON as ``byte_rule``)
SUMMARY = ("bytes = passes x (every input the method reads, the base included where it reads it) + the output "
           "written once; passes = 1 for the merge + 1 per whole-tensor quantity (a k-th largest |delta|, an L1 "
           "norm, a dot product) that every output element depends on")


@dataclasses.dataclass(frozen=True)
class ByteRule:
    words: str
    passes: Callable[[Any], int | None]


def _fixed(k: int | None) -> Callable[[Any], int | None]:
    return lambda p: k


def _sparse(p: Any) -> bool:
    """Some model keeps only part of its delta (density < 1)."""
    return any(d < 1 for d in p.density)


ONE = "every input read once, the output written once (elementwise)"
RULES: dict[str, ByteRule] = {
    "linear": ByteRule(ONE + "; the base is not an input", _fixed(1)),
    "task_arithmetic": ByteRule(ONE, _fixed(1)),
    "ties": ByteRule(
        "every input (fine-tunes and base) read twice - once to find each model's k-th largest |delta|, "
        "once to merge - the output written once; once when every density is 1 (no selection)",
        lambda p: 2 if _sparse(p) else 1),
    "dare_linear": ByteRule(
        "every input read twice - the L1 rescale needs ||delta||_1 and ||m*delta||_1 over the whole tensor - "
        "the output written once; once with rescale off or density 1",
        lambda p: 2 if (p.rescale and _sparse(p)) else 1),
    "breadcrumbs": ByteRule(
        "every input read twice - the kept band of |delta| ranks is over the whole tensor - the output written once; "
        "once when every density is 1",
        lambda p: 2 if _sparse(p) else 1),
    "della": ByteRule(
        "every input read twice - the ranks are per row (in cache) but the L1 rescale is over the whole tensor - "
        "the output written once; once with rescale off or density 1",
        lambda p: 2 if (p.rescale and _sparse(p)) else 1),
    "sce": ByteRule(
        "every input read three times - the k-th largest variance, then each model's mean square of the "
        "selected deltas, then the merge - the output written once; twice with select_topk 1",
        lambda p: 3 if p.select_topk < 1 else 2),
    "arcee_fusion": ByteRule(
        "both inputs read twice - the importance quantiles are over the whole tensor (the KL term is per row) - "
        "the output written once", _fixed(2)),
    "ram": ByteRule(ONE, lambda p: 2 if p.plus else 1),
    "passthrough": ByteRule("the one input read once, the output written once (a copy)", _fixed(1)),
    "slerp": ByteRule("both inputs read twice - the norms and the dot product first - the output written once", _fixed(2)),
    "nuslerp": ByteRule(
        "every input read twice when flattened (norms and dot product over the whole tensor), once per row "
        "or column otherwise; the output written once",
        lambda p: 2 if p.flatten else 1),
    "multislerp": ByteRule("every input read twice - the norms and the mean direction first - the output written once", _fixed(2)),
    "model_stock": ByteRule(
        "every input read twice - the Gram matrix of the deltas over the whole tensor first - the output written "
        "once; once with filter_wise (one angle per row)",
        lambda p: 1 if p.filter_wise else 2),
    "nearswap": ByteRule(ONE, _fixed(1)),
    "karcher": ByteRule("iterative: the passes depend on convergence (up to 2 + 2*max_iter); no GB/s reported", _fixed(None)),
    "cart": ByteRule("a truncated SVD per model: compute-bound, no GB/s reported", _fixed(None)),
    "m_ties": ByteRule("needs forward passes through the merged layers (engine 'layerwise'): not a per-tensor kernel", _fixed(None)),
}
# the variants share their family's rule
RULES["dare_ties"] = RULES["dare_linear"]
RULES["breadcrumbs_ties"] = RULES["breadcrumbs"]
RULES["della_linear"] = RULES["della"]
RULES["ramplus_tl"] = ByteRule(
    "every input read twice - each model's shared and unique counts over the whole tensor first - the output written once",
    RULES["ram"].passes)


def rule(method: MergeMethod) -> ByteRule:
    try:
        return RULES[method.name]
    except KeyError:
        raise KeyError(f"fastmerge.benchmark.bytes: no byte rule for method '{method.name}' (add one to RULES)") from None


def reads_base(method: MergeMethod, has_base: bool) -> bool:
    return has_base and method.base_policy != "ignored"


def physical_bytes(method: MergeMethod, params: Any, n: int, n_inputs: int, in_itemsize: int, out_itemsize: int,
                   has_base: bool) -> int | None:
    """The bytes ``method`` must move to merge one tensor of ``n`` elements from ``n_inputs`` non-base inputs
    of ``in_itemsize`` bytes per element (plus a base of the same size where it reads one) into an output of
    ``out_itemsize`` bytes per element. None: no bandwidth figure for this method (see its rule)."""
    passes = rule(method).passes(params)
    if passes is None:
        return None
    inputs = n_inputs + (1 if reads_base(method, has_base) else 0)
    return passes * inputs * n * in_itemsize + n * out_itemsize


def describe(method: MergeMethod, params: Any) -> str:
    """The rule in words, with the pass count for these parameters."""
    passes = rule(method).passes(params)
    return rule(method).words + ("" if passes is None else f" [{passes} pass{'es' if passes > 1 else ''}]")
