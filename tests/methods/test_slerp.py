"""slerp: closed-form cases (end points, orthogonal / 60° / collinear pairs), validation, backends."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.slerp import CHUNK, SlerpParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("slerp")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}


def test_t0_is_the_base_and_t1_the_other_model_exactly():
    # sin((1−t)θ)/sin θ is exactly 1 at t = 0 and sin(tθ)/sin θ exactly 1 at t = 1; the other term is 0
    b, x = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(ref([x], b, SlerpParams(0.0)), b)
    assert torch.equal(ref([x], b, SlerpParams(1.0)), x)


def test_orthogonal_pair_interpolates_the_raw_vectors():
    # θ = π/2; t = 0.5: both coefficients sin(π/4)/sin(π/2) = 1/√2, applied to the RAW vectors (norms 3, 5)
    out = ref([torch.tensor([0.0, 5.0])], torch.tensor([3.0, 0.0]), SlerpParams(0.5))
    assert torch.allclose(out, torch.tensor([3 / math.sqrt(2), 5 / math.sqrt(2)]), rtol=0, atol=2e-7 * 5)
    # unit vectors: the midpoint of the arc, (a + b)/√2, on the unit circle
    unit = ref([torch.tensor([0.0, 1.0])], torch.tensor([1.0, 0.0]), SlerpParams(0.5))
    assert torch.allclose(unit, torch.tensor([2**-0.5, 2**-0.5]), rtol=0, atol=1e-7)


def test_sixty_degrees_by_hand():
    # a = (1, 0), b = 2·(cos 60°, sin 60°): θ = π/3; at t = 0.5 each coefficient is sin(π/6)/sin(π/3) = 1/√3
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([1.0, math.sqrt(3)])
    out = ref([b], a, SlerpParams(0.5))
    want = torch.tensor([2 / math.sqrt(3), 1.0])
    assert torch.allclose(out, want, rtol=0, atol=4e-7)
    # t = 0.25: coefficients sin(π/4)/sin(π/3) and sin(π/12)/sin(π/3)
    s = math.sin(math.pi / 3)
    ca, cb = math.sin(math.pi / 4) / s, math.sin(math.pi / 12) / s
    out = ref([b], a, SlerpParams(0.25))
    assert torch.allclose(out, torch.tensor([ca + cb, cb * math.sqrt(3)]), rtol=0, atol=4e-7)


@pytest.mark.parametrize("scale", [2.0, -3.0])
def test_collinear_and_antipodal_pairs_lerp(scale):
    # |cos θ| = 1 > 0.9995: plain (1 − t)·a + t·b
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    out = ref([scale * a], a, SlerpParams(0.3))
    assert torch.allclose(out, 0.7 * a + 0.3 * scale * a, rtol=0, atol=1e-6)


def test_zero_base_counts_as_orthogonal():
    # a norm ≤ 1e-8 is replaced by 1 (mergekit): the dot is 0, θ = π/2, so out = sin(tπ/2)·x
    x = torch.tensor([1.0, 2.0, -2.0])
    out = ref([x], torch.zeros(3), SlerpParams(0.5))
    assert torch.allclose(out, x * math.sin(math.pi / 4), rtol=0, atol=1e-6)


def test_shape_and_multi_chunk_tensor_against_float64():
    # more than one 2^20-element chunk: the per-chunk norms / dot sums must still give the slerp
    n = CHUNK + 4099
    a, b = torch.randn(n), torch.randn(n)
    ad, bd = a.double(), b.double()
    theta = torch.acos((ad / ad.norm()) @ (bd / bd.norm()))
    t = 0.37
    want = (torch.sin((1 - t) * theta) * ad + torch.sin(t * theta) * bd) / torch.sin(theta)
    got = ref([b.reshape(-1, 1)], a.reshape(-1, 1), SlerpParams(t))
    assert got.shape == (n, 1) and got.dtype == torch.float32
    assert torch.allclose(got.reshape(-1).double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_mode_is_the_formula_in_float64(dtype):
    # the fp64 Gram matrix and coefficients leave only the fp32 rounding of the combination
    b, x = torch.randn(70, 33).to(dtype), torch.randn(70, 33).to(dtype)
    want = ref([x.double()], b.double(), SlerpParams(0.3), compat=True)  # mergekit's sequence, in fp64
    got = ref([x], b, SlerpParams(0.3))
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())


def test_compat_returns_the_compute_dtype():
    b, x = torch.randn(9).bfloat16(), torch.randn(9).bfloat16()
    assert ref([x], b, SlerpParams(0.4), compat=True).dtype == torch.bfloat16
    assert ref([x], b, SlerpParams(0.4)).dtype == torch.float32


def test_both_modes_are_the_same_slerp():
    # mergekit computes slerp in fp32: default (fp64 coefficients, one fused pass) and compat (its exact
    # fp32 sequence) differ by rounding only, at the fp32 level
    b, x = torch.randn(1000), torch.randn(1000)
    d, c = ref([x], b, SlerpParams(0.4)), ref([x], b, SlerpParams(0.4), compat=True)
    assert torch.allclose(d, c, rtol=0, atol=4 * 2**-23 * float(c.abs().max()))


def test_validation():
    b, x = torch.randn(4), torch.randn(4)
    with pytest.raises(ConfigError, match="missing required parameter 't'"):
        merge_tensors("slerp", [x], b)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("slerp", [x, b], t=0.5)
    with pytest.raises(ConfigError, match=r"tensor\(s\) besides the base, got 2"):
        merge_tensors("slerp", [x, x], b, t=0.5)
    with pytest.raises(ConfigError, match="exactly one other model"):  # the reference guards itself too
        ref([x, x], b, SlerpParams(0.5))
    with pytest.raises(ConfigError, match="must be a number"):
        merge_tensors("slerp", [x], b, t="half")


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, SlerpParams(0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (2**16 + 3,)])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, compat):
    _runs(backend)
    b = torch.randn(shape).to(dtype)
    x = (b.float() + 0.5 * torch.randn(shape)).to(dtype)
    got = merge_tensors("slerp", [x], b, backend=backend, t=0.35, mergekit_compat=compat)
    want = ref([x], b, SlerpParams(0.35), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"slerp {backend} {dtype} {shape} compat={compat}")
