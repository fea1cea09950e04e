"""task_arithmetic: closed-form cases of the reference (both modes), then every backend against it."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.methods import get_method
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
from helpers.tolerance import assert_bitwise_equal

ref = get_method("task_arithmetic").reference


def test_zero_weights_give_base():
    b = torch.randn(100)
    xs = [torch.randn(100), torch.randn(100)]
    assert torch.equal(ref(xs, b, TaskArithmeticParams((0.0, 0.0))), b)


def test_formula_against_float64():
    b = torch.randn(500)
    xs = [b + 0.1 * torch.randn(500) for _ in range(3)]
    w, lam = (0.3, 0.6, 1.2), 0.8
    got = ref(xs, b, TaskArithmeticParams(w, normalize=True, lambda_=lam)).double()
    want = b.double() + lam * sum(wi * (x.double() - b.double()) for wi, x in zip(w, xs)) / sum(w)
    assert (got - want).abs().max() < 1e-6


def test_compat_mode_rounds_in_bf16():
    # mergekit computes δ, w·δ and their sum in bf16: the compat result must be reproducible by that recipe
    b = torch.randn(4096).bfloat16()
    xs = [(b.float() + 0.01 * torch.randn(4096)).bfloat16() for _ in range(3)]
    w = (0.33, 0.33, 0.33)
    got = ref(xs, b, TaskArithmeticParams(w), compat=True)
    assert got.dtype == torch.bfloat16
    wt = torch.tensor(w, dtype=torch.bfloat16).view(-1, 1)
    want = (b + (torch.stack([x - b for x in xs]) * wt).sum(0)).bfloat16()
    assert torch.equal(got, want)
    fp32 = ref(xs, b, TaskArithmeticParams(w)).bfloat16()
    assert not torch.equal(fp32, got)  # the two modes really differ on bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 2**16 + 3])
@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7)])
def test_backend_matches_reference(backend, dtype, n, normalize, lam):
    b = torch.randn(n).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(n)).to(dtype) for _ in range(3)]
    w = [0.3, 0.5, 0.4]
    got = merge_tensors("task_arithmetic", xs, b, weight=w, normalize=normalize, backend=backend, **{"lambda": lam})
    want = ref(xs, b, TaskArithmeticParams(tuple(w), normalize, lam)).to(dtype)
    assert_bitwise_equal(got, want, f"task_arithmetic {backend} {dtype} n={n}")
