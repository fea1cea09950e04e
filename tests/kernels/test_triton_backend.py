"""fastmerge/backends/triton.py: what the kernels cover (and say they do not), and the per-tensor path
(``merge_tensors(..., backend="triton")``) against the torch backend for every covered method."""

import dataclasses

import pytest
import torch

from fastmerge import backends, merge_tensors
from fastmerge.backends import triton as tb
from fastmerge.backends.base import MergeJob
from fastmerge.errors import BackendUnavailableError
from fastmerge.methods import get_method
from fastmerge.methods.breadcrumbs import BreadcrumbsParams
from fastmerge.methods.model_stock import ModelStockParams
from fastmerge.methods.ties import TiesParams
from helpers.kernel_cases import METHOD_CASES as CASES, assert_bits_equal, needs_triton

pytestmark = needs_triton


def test_every_kernel_method_has_a_case():
    assert set(CASES) == set(tb.KERNELS)


@pytest.mark.parametrize("method", sorted(CASES))
def test_triton_backend_equals_torch_backend(method):
    g = torch.Generator().manual_seed(11)
    b = torch.randn(23, 19, generator=g)
    n = 1 if method == "slerp" else 3
    xs = [(b + 0.05 * torch.randn(23, 19, generator=g)).bfloat16() for _ in range(n)]
    kw = dict(CASES[method], seed=5, tensor_name="model.layers.1.self_attn.o_proj.weight")
    got = merge_tensors(method, xs, b.bfloat16(), backend="triton", **kw)
    want = merge_tensors(method, xs, b.bfloat16(), backend="torch", **kw)
    assert_bits_equal(got, want, method)


def _job(name, params, compat=False):
    return MergeJob("t", get_method(name), params, compat)


def test_reasons_name_what_is_not_covered():
    ties = TiesParams((1.0,), (0.5,))
    assert backends.BACKENDS["triton"].not_supported_reasons(_job("ties", ties), "cpu") == []  # interpreter
    assert "torch backend only" in " ".join(tb.param_reasons(_job("ties", ties, compat=True)))
    assert tb.param_reasons(_job("linear", get_method("linear").params_type((1.0,)), compat=True)) == []
    bc = BreadcrumbsParams((1.0,), (0.5,), (0.01,), selection="topk")
    assert "topk" in " ".join(tb.param_reasons(_job("breadcrumbs", bc)))
    assert "filter_wise" in " ".join(tb.param_reasons(_job("model_stock", ModelStockParams(True))))
    assert "no Triton kernel for 'sce'" in tb.param_reasons(_job("sce", None))[0]
    with pytest.raises(BackendUnavailableError, match="topk"):
        merge_tensors("breadcrumbs", [torch.randn(8)], torch.randn(8), backend="triton", weight=1.0, density=0.5, selection="topk")


def test_needs_cuda_or_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backends.BACKENDS["triton"].not_supported_reasons(_job("ties", TiesParams((1.0,), (0.5,))), "cuda")
    assert reasons == ["needs a CUDA device (or TRITON_INTERPRET=1)"]


def test_auto_selection_on_cuda_prefers_triton_for_covered_methods(monkeypatch):
    monkeypatch.setattr(tb, "_cuda", lambda: True)  # pretend: only the selection is checked here
    name, skipped = backends.select(_job("ties", TiesParams((1.0,), (0.5,))), "cuda")
    assert name == "triton" and skipped["cuda"]
    name, _ = backends.select(_job("ties", TiesParams((1.0,), (0.5,)), compat=True), "cuda")
    assert name == "torch"


def test_auto_selection_on_cuda_sends_small_ties_tensors_to_triton(monkeypatch):
    """The plan names the backend gpu_runner really uses: ties tensors under cuda.MIN_ELEMS are batched on
    Triton; from it (or with an unknown size) the CUDA C++ kernel; ``--backend cuda`` forces it at any size."""
    from fastmerge import _native
    from fastmerge.backends import cuda as cb

    monkeypatch.setattr(tb, "_cuda", lambda: True)
    monkeypatch.setattr(_native, "cuda_usable", lambda: (True, ""))
    ties = TiesParams((1.0,), (0.5,))

    def job(numel):
        return dataclasses.replace(_job("ties", ties), numel=numel)

    name, skipped = backends.select(job(cb.MIN_ELEMS - 1), "cuda")
    assert name == "triton" and "batched on Triton" in skipped["cuda"][0]
    assert backends.select(job(cb.MIN_ELEMS), "cuda")[0] == "cuda"
    assert backends.select(job(None), "cuda")[0] == "cuda"
    assert backends.select(job(10), "cuda", "cuda")[0] == "cuda"
    # linear has no CUDA C++ kernel: Triton whatever the size, and the reason is the kernel, not the size
    lin = dataclasses.replace(_job("linear", get_method("linear").params_type((1.0,))), numel=10)
    name, skipped = backends.select(lin, "cuda")
    assert name == "triton" and "no CUDA C++ kernel" in skipped["cuda"][0]
