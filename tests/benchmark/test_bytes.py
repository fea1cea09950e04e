"""The physical-minimum byte rule, hand-computed per method (n = 100 elements)."""

from __future__ import annotations

import pytest

from fastmerge.benchmark import bytes as br
from fastmerge.benchmark.kernels import bench_params
from fastmerge.methods import REGISTRY, get_method

N = 100


def nbytes(method: str, T: int, in_size: int = 2, out_size: int = 2, has_base: bool = True, **over) -> int | None:
    p, _ = bench_params(method, T)
    if over:
        import dataclasses

        p = dataclasses.replace(p, **over)
    return br.physical_bytes(get_method(method), p, N, T, in_size, out_size, has_base)


def test_every_registered_method_has_a_rule_in_words():
    missing = sorted(set(REGISTRY) - set(br.RULES))
    assert not missing, f"add a byte rule to fastmerge/benchmark/bytes.py RULES for: {missing}"
    for name, r in br.RULES.items():
        assert len(r.words) > 20, name


@pytest.mark.parametrize("method,T,want", [
    # linear: 3 inputs read once (the base is not an input), output once: 3*100*2 + 100*2
    ("linear", 3, 800),
    # task_arithmetic: base + 3 read once, output once: 4*200 + 200
    ("task_arithmetic", 3, 1000),
    # ties (density 0.5): base + 3 read twice (select, merge), output once: 2*4*200 + 200
    ("ties", 3, 1800),
    ("ties", 1, 2 * 2 * 200 + 200),
    # dare (rescale on by default): the L1 norms first: 2 passes
    ("dare_ties", 3, 1800),
    ("dare_linear", 2, 2 * 3 * 200 + 200),
    ("breadcrumbs", 3, 1800),
    ("breadcrumbs_ties", 3, 1800),
    ("della", 3, 1800),
    # sce (select_topk 1.0 default: no selection): weights, then merge: 2 passes
    ("sce", 3, 1800),
    # slerp: base + one model, norms and dot first: 2*2*200 + 200
    ("slerp", 1, 1000),
    ("nearswap", 1, 2 * 200 + 200),
    # passthrough: one input (a base is ignored), read once, written once
    ("passthrough", 1, 400),
    ("model_stock", 3, 1800),
    ("multislerp", 3, 1800),
    ("ram", 3, 1000),
    ("ramplus_tl", 3, 1800),
    ("arcee_fusion", 1, 2 * 2 * 200 + 200),
])
def test_hand_computed(method, T, want):
    assert nbytes(method, T) == want


def test_parameters_change_the_pass_count():
    assert nbytes("ties", 3, density=(1.0, 1.0, 1.0)) == 1000  # no selection: one pass
    assert nbytes("dare_ties", 3, rescale=False) == 1000  # no L1 norms: one pass
    assert nbytes("sce", 3, select_topk=0.5) == 3 * 4 * 200 + 200  # variance threshold, weights, merge
    assert nbytes("model_stock", 3, filter_wise=True) == 1000  # one angle per row: in cache
    assert nbytes("nuslerp", 2, flatten=False) == 3 * 200 + 200


def test_dtypes_and_missing_base():
    # fp32 inputs, bf16 output: 2*4*100*4 + 100*2
    assert nbytes("ties", 3, in_size=4, out_size=2) == 3400
    # no base given: the base term drops out
    assert nbytes("task_arithmetic", 3, has_base=False) == 800


def test_methods_without_a_bandwidth_figure():
    for m in ("karcher", "cart"):
        p, _ = bench_params(m, 2)
        assert br.physical_bytes(get_method(m), p, N, 2, 2, 2, True) is None
        assert "no GB/s" in br.describe(get_method(m), p)
