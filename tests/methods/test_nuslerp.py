"""nuslerp: t from the weights, task-vector vs raw SLERP, flatten / per-row / per-column, validation, backends."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.nuslerp import NuslerpParams, nuslerp_t
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("nuslerp")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}
R2 = 2**-0.5


def test_t_from_the_weights():
    assert nuslerp_t((1.0, 1.0)) == 0.5
    assert nuslerp_t((1.0, 3.0)) == 0.75
    assert nuslerp_t((2.0, 0.0)) == 0.0
    assert nuslerp_t((1.0, -1.0)) == 0.5  # |Σw| < 1e-6: the midpoint
    assert nuslerp_t((0.3, -0.3 + 1e-7)) == 0.5


def test_orthogonal_task_vectors_around_the_base():
    # δ1 = (3, 0), δ2 = (0, 5): θ = π/2, equal weights: base + (δ1 + δ2)/√2
    base = torch.tensor([1.0, -1.0])
    out = ref([base + torch.tensor([3.0, 0.0]), base + torch.tensor([0.0, 5.0])], base, NuslerpParams((1.0, 1.0)))
    assert torch.allclose(out, base + torch.tensor([3 * R2, 5 * R2]), rtol=0, atol=1e-6)


def test_without_base_the_raw_models_are_interpolated():
    out = ref([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])], None, NuslerpParams((1.0, 1.0)))
    assert torch.allclose(out, torch.tensor([2 * R2, 2 * R2]), rtol=0, atol=1e-6)


def test_weights_move_t():
    # weights (1, 3): t = 0.75 on a right angle: coefficients sin(π/8) and sin(3π/8)
    out = ref([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], None, NuslerpParams((1.0, 3.0)))
    assert torch.allclose(out, torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]), rtol=0, atol=1e-6)


def test_collinear_task_vectors_lerp():
    base = torch.randn(6)
    d = torch.randn(6)
    out = ref([base + d, base + 3 * d], base, NuslerpParams((1.0, 1.0)))
    assert torch.allclose(out, base + 2 * d, rtol=0, atol=1e-5)


# rows: row 0 orthogonal, row 1 collinear. columns: col 0 orthogonal, col 1 collinear.
V0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
V1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])


def test_per_row_when_not_flattened():
    out = ref([V0, V1], None, NuslerpParams((1.0, 1.0), flatten=False))
    assert torch.allclose(out, torch.tensor([[R2, R2], [1.5, 0.0]]), rtol=0, atol=1e-6)


def test_row_wise_takes_vectors_along_dim0():
    c0, c1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    out = ref([c0, c1], None, NuslerpParams((1.0, 1.0), flatten=False, row_wise=True))
    assert torch.allclose(out, torch.tensor([[R2, 1.5], [R2, 0.0]]), rtol=0, atol=1e-6)


def test_flatten_wins_over_row_wise():
    # one angle for the whole tensor: cos θ = 2/(√2·√5)
    flat = ref([V0, V1], None, NuslerpParams((1.0, 1.0), flatten=True, row_wise=True))
    theta = math.acos(2 / math.sqrt(10))
    c = math.sin(theta / 2) / math.sin(theta)
    assert torch.allclose(flat, c * (V0 + V1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 24), (6, 5, 4)])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_default_mode_is_the_formula_in_float64(shape, flatten, row_wise, dtype):
    b = torch.randn(shape)
    xs = [(b + 0.1 * torch.randn(shape)).to(dtype) for _ in range(2)]
    b = b.to(dtype)
    p = NuslerpParams((0.3, 0.5), flatten, row_wise)
    want = ref([x.double() for x in xs], b.double(), p, compat=True)  # mergekit's sequence, in fp64
    got = ref(xs, b, p)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())


def test_compat_stays_in_the_compute_dtype():
    b = torch.randn(40).bfloat16()
    xs = [(b.float() + torch.randn(40)).bfloat16() for _ in range(2)]
    assert ref(xs, b, NuslerpParams((0.4, 0.6)), compat=True).dtype == torch.bfloat16
    assert ref(xs, b, NuslerpParams((0.4, 0.6))).dtype == torch.float32


def test_validation():
    b, x = torch.randn(4), torch.randn(4)
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        merge_tensors("nuslerp", [x, x], b)
    with pytest.raises(ConfigError, match=r"tensor\(s\) besides the base, got [13]"):
        merge_tensors("nuslerp", [x], b, weight=1.0)
    with pytest.raises(ConfigError, match=r"tensor\(s\) besides the base, got [13]"):
        merge_tensors("nuslerp", [x, x, x], None, weight=1.0)
    with pytest.raises(ConfigError, match="exactly two models"):  # the reference guards itself too
        ref([x], b, NuslerpParams((1.0,)))
    with pytest.raises(ConfigError, match="must be a boolean"):
        merge_tensors("nuslerp", [x, x], b, weight=1.0, nuslerp_flatten="sometimes")


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, NuslerpParams((1.0, 1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65)])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, flatten, row_wise, with_base, compat):
    _runs(backend)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.5 * torch.randn(shape)).to(dtype) for _ in range(2)]
    base = b if with_base else None
    kw = dict(weight=[0.3, 0.55], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    got = merge_tensors("nuslerp", xs, base, backend=backend, mergekit_compat=compat, **kw)
    want = ref(xs, base, NuslerpParams((0.3, 0.55), flatten, row_wise), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"nuslerp {backend} {dtype} {shape} {kw} base={with_base} compat={compat}")
