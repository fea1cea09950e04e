"""Every registered method has its tests and its benchmark row; every kernel has its kernel tests.

The rule: a method's tests are named after the module its class lives in (``fastmerge.methods.<module>``),
so methods that share a module share a file (dare_linear and dare_ties: ``dare``; della_linear: ``della``;
breadcrumbs_ties: ``breadcrumbs``; ramplus_tl: ``ram``):

* ``tests/methods/test_<module>.py``;
* with a native C++ kernel: ``tests/native/test_native_<module>.py``;
* with a Triton kernel: ``tests/kernels/test_triton_<module>.py``;

each file naming the method (``"<name>"`` in quotes). The few methods tested in a shared file are listed
below with that file. Benchmarks: every method is a row of ``bench/bench_end_to_end.py``'s ``SPECS``
(m_ties, which needs calibration data, has its own end-to-end benchmark in ``bench/bench_mloss.py``).

Which methods have a kernel: the methods' declarations ``MergeMethod.native`` / ``MergeMethod.triton``
(not None), for the backends ``fastmerge.backends.BACKENDS["native" | "triton"]``; without them, the
``KERNELS`` table of the module that defines the backend's class.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from fastmerge.backends import BACKENDS
from fastmerge.methods import REGISTRY
from fastmerge.methods.base import MergeMethod

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

#: method -> its test file, where it is not test_<module>.py of the directory
SHARED = {
    "methods": {"m_ties": "mloss/test_mties.py"},  # tested with the M-Loss code it depends on
    "native": {
        "linear": "native/test_native_ops.py",  # weighted_delta_sum
        "task_arithmetic": "native/test_native_ops.py",
        # a byte copy (ctypes.memmove) on the torch-free path, no C++ kernel
        "passthrough": "engine/test_stream.py",
    },
    "triton": {
        "task_arithmetic": "kernels/test_triton_linear.py",
        "slerp": "kernels/test_triton_geometric.py",
        "model_stock": "kernels/test_triton_geometric.py",
    },
}
PATTERN = {"methods": "methods/test_{}.py", "native": "native/test_native_{}.py", "triton": "kernels/test_triton_{}.py"}
BENCH_ELSEWHERE = {"m_ties": ("bench_mloss.py", '"m_ties"')}


def module_of(name: str) -> str:
    return type(REGISTRY[name]).__module__.rsplit(".", 1)[-1]


def kernel_methods(backend: str) -> list[str]:
    """Methods the ``backend`` has a kernel for: the methods' declarations (``MergeMethod.native`` /
    ``.triton``), else the ``KERNELS`` table of the module defining the backend's class."""
    assert backend in BACKENDS
    if hasattr(MergeMethod, backend):
        return sorted(name for name, m in REGISTRY.items() if getattr(m, backend) is not None)
    mod = sys.modules[type(BACKENDS[backend]).__module__]
    table = getattr(mod, "KERNELS", None)
    assert table is not None, f"no kernel declarations for {backend}: update tests/test_registry.py::kernel_methods"
    return sorted(table)


def file_for(kind: str, name: str) -> Path:
    return TESTS / SHARED[kind].get(name, PATTERN[kind].format(module_of(name)))


def check(kind: str, names: list[str]) -> None:
    problems = []
    for name in names:
        f = file_for(kind, name)
        if not f.is_file():
            problems.append(f"{name}: no {f.relative_to(REPO)}")
        elif f'"{name}"' not in f.read_text() and f"'{name}'" not in f.read_text():
            problems.append(f"{name}: {f.relative_to(REPO)} does not name it")
    assert not problems, f"{kind} tests missing:\n  " + "\n  ".join(problems)


def test_every_method_has_its_test_file():
    check("methods", sorted(REGISTRY))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_every_kernel_has_its_backend_tests(backend):
    names = kernel_methods(backend)
    assert names and set(names) <= set(REGISTRY), f"{backend} kernels of unregistered methods: {set(names) - set(REGISTRY)}"
    check(backend, names)


def test_every_method_has_a_benchmark_row():
    tree = ast.parse((REPO / "bench" / "bench_end_to_end.py").read_text())
    specs = next(
        node.value for node in tree.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "SPECS" for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
    )
    rows = {k.value for k in specs.keys}
    missing = []
    for name in sorted(REGISTRY):
        if name in BENCH_ELSEWHERE:
            file, needle = BENCH_ELSEWHERE[name]
            if needle not in (REPO / "bench" / file).read_text():
                missing.append(f"{name} (expected in bench/{file})")
        elif name not in rows:
            missing.append(name)
    assert not missing, f"methods without a benchmark row in bench/bench_end_to_end.py SPECS: {missing}"
    assert rows <= set(REGISTRY), f"benchmark rows of unregistered methods: {rows - set(REGISTRY)}"
