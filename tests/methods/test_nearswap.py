"""nearswap: a hand-computed 4-element case, the t extremes, the 1e-6 floor, validation, backends."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.nearswap import NearswapParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("nearswap")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}


def test_four_elements_by_hand():
    # |b − x| = 0.05, 0.2, 1.0, 0 with t = 0.1: w = min(2, 1) = 1, 0.5, 0.1, min(0.1/1e-6, 1) = 1
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x = torch.tensor([1.05, 0.8, 2.0, 1.0])
    out = ref([x], b, NearswapParams(0.1))
    assert torch.allclose(out, torch.tensor([1.05, 0.9, 1.1, 1.0]), rtol=0, atol=2e-7)


def test_differences_below_the_floor_divide_by_1e6():
    # |b − x| = 5e-7 < 1e-6: w = t/1e-6 = 0.1 (not t/5e-7 = 0.2), out = 0.1·5e-7. Equal elements get the same
    # w = 0.1 and stay put up to rounding: 0.1·3 + 0.9·3 is 3 − 1 ulp in fp32
    b = torch.tensor([3.0, 0.0])
    x = torch.tensor([3.0, 5e-7])
    out = ref([x], b, NearswapParams(1e-7))
    assert out[0].item() == pytest.approx(3.0, abs=3e-7)
    assert out[1].item() == pytest.approx(5e-8, rel=1e-6)


def test_t_extremes():
    b, x = torch.randn(50), torch.randn(50)
    assert torch.equal(ref([x], b, NearswapParams(0.0)), b)  # w = 0
    assert torch.equal(ref([x], b, NearswapParams(-1.0)), b)  # clamped to 0
    assert torch.equal(ref([x], b, NearswapParams(1e9)), x)  # w = 1 everywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.05, 3e-7])
def test_default_mode_is_the_formula_in_float64(t, dtype):
    # t ≥ 1e-6: the clamp form; below: b + w·(x − b)
    b = torch.randn(2000)
    x = (b + 0.1 * torch.randn(2000) * (torch.rand(2000) < 0.5) + 1e-6 * torch.randn(2000)).to(dtype)
    b = b.to(dtype)
    want = ref([x.double()], b.double(), NearswapParams(t), compat=True)
    got = ref([x], b, NearswapParams(t))
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())
    if t >= 1e-6:  # x itself where it is within t of the base
        near = (x.double() - b.double()).abs() < 0.99 * t
        assert torch.equal(got[near], x[near].float())


def test_validation():
    b, x = torch.randn(4), torch.randn(4)
    with pytest.raises(ConfigError, match="missing required parameter 't'"):
        merge_tensors("nearswap", [x], b)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("nearswap", [x, b], t=0.1)
    with pytest.raises(ConfigError, match=r"tensor\(s\) besides the base, got 2"):
        merge_tensors("nearswap", [x, x], b, t=0.1)
    with pytest.raises(ConfigError, match="exactly one other model"):  # the reference guards itself too
        ref([x, x], b, NearswapParams(0.1))


def _runs(backend: str, compat: bool = False) -> None:
    skip_unless_runs(backend, METHOD, NearswapParams(0.1), compat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (2**16 + 3,)])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, compat):
    _runs(backend, compat)
    b = torch.randn(shape).to(dtype)
    x = (b.float() + 0.1 * torch.randn(shape)).to(dtype)
    got = merge_tensors("nearswap", [x], b, backend=backend, t=0.05, mergekit_compat=compat)
    want = ref([x], b, NearswapParams(0.05), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"nearswap {backend} {dtype} {shape} compat={compat}")
