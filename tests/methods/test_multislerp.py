"""multislerp: one model, orthogonal pairs, weights (normalised or not), antipodal fallbacks, validation, backends."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.multislerp import MultislerpParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("multislerp")
ref = METHOD.reference
#: default mode vs the fp64 formula, × max|result|: fp32-level errors (16-bit inputs: fp32 Gram blocks)
BOUND = {torch.float32: 2 * 2**-24, torch.bfloat16: 8 * 2**-24}
R2 = 2**-0.5
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_one_model_is_that_model_exactly():
    x = torch.randn(3, 5)
    assert torch.equal(ref([x], None, MultislerpParams((0.7,))), x)
    assert torch.equal(ref([x], torch.randn(3, 5), MultislerpParams((0.7,))), x)  # base or not, as mergekit


def test_two_orthogonal_unit_vectors_give_the_normalised_midpoint():
    out = ref([E1, E2], None, MultislerpParams((1.0, 1.0)))
    assert torch.allclose(out, torch.tensor([R2, R2]), rtol=0, atol=1e-6)


def test_scaled_by_the_weighted_mean_norm():
    # directions e1, e2 (norms 3 and 5): midpoint direction, scaled by 0.5·3 + 0.5·5 = 4
    out = ref([3 * E1, 5 * E2], None, MultislerpParams((1.0, 1.0)))
    assert torch.allclose(out, 4 * torch.tensor([R2, R2]), rtol=0, atol=4e-6)
    # weights normalised: (2, 2) is (1, 1); not normalised: the norm scale is 1·3 + 1·5 = 8
    assert torch.allclose(ref([3 * E1, 5 * E2], None, MultislerpParams((2.0, 2.0))), out, rtol=0, atol=4e-6)
    raw = ref([3 * E1, 5 * E2], None, MultislerpParams((1.0, 1.0), normalize_weights=False))
    assert torch.allclose(raw, 8 * torch.tensor([R2, R2]), rtol=0, atol=1e-5)


def test_unequal_weights_pick_the_normalised_weighted_mean_direction():
    # m = 0.75·e1 + 0.25·e2 → direction (3, 1)/√10 (the tangent mean at m̂ is 0), norm scale 1
    out = ref([E1, E2], None, MultislerpParams((3.0, 1.0)))
    assert torch.allclose(out, torch.tensor([3.0, 1.0]) / 10**0.5, rtol=0, atol=1e-6)


def test_task_vectors_around_the_base():
    base = torch.tensor([1.0, 2.0])
    out = ref([base + 3 * E1, base + 5 * E2], base, MultislerpParams((1.0, 1.0)))
    assert torch.allclose(out, base + 4 * torch.tensor([R2, R2]), rtol=0, atol=4e-6)


def test_identical_models_are_a_fixed_point():
    x = torch.randn(50)
    assert torch.allclose(ref([x, x, x], None, MultislerpParams((0.2, 0.3, 0.5))), x, rtol=1e-6, atol=1e-6)


def test_two_antipodal_models_fall_back_to_lerp():
    # u1 + u2 = 0 with equal weights: mergekit lerps the (task) vectors: 0.5·d − 0.5·d = 0 → the base
    base, d = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([2.0, 1.0, -3.0])
    out = ref([base + d, base - d], base, MultislerpParams((1.0, 1.0)))
    assert torch.allclose(out, base, rtol=0, atol=1e-6)


def test_more_antipodal_models_are_an_error():
    d = torch.tensor([2.0, 1.0, -3.0])
    with pytest.raises(ConfigError, match="antipodal"):
        ref([d, -d, torch.tensor([1.0, 0.0, 0.0])], None, MultislerpParams((1.0, 1.0, 0.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_default_mode_is_the_formula_in_float64(with_base, dtype):
    # mergekit's exp-map sequence in fp64 (its τ is then ~1e-16 instead of fp32 noise) vs the closed form
    b = torch.randn(40, 24)
    xs = [(b + 0.1 * torch.randn(40, 24)).to(dtype) for _ in range(3)]
    b = b.to(dtype)
    base = b if with_base else None
    p = MultislerpParams((0.2, 0.5, 0.4))
    want = ref([x.double() for x in xs], None if base is None else base.double(), p, compat=True)
    got = ref(xs, base, p)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= BOUND[dtype] * float(want.abs().max())


def test_validation():
    x = torch.randn(4)
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensors("multislerp", [x, x], weight=[1.0, -1.0])
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        merge_tensors("multislerp", [x, x])
    with pytest.raises(ConfigError, match="has 3 values for 2 tensors"):
        merge_tensors("multislerp", [x, x], weight=[1.0, 1.0, 1.0])
    # not normalised, a zero sum is fine
    merge_tensors("multislerp", [x, 2 * x + 1], weight=[1.0, -1.0], normalize_weights=False, backend="torch")


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, MultislerpParams((1.0, 1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65)])
@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, n_models, with_base, compat):
    _runs(backend)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.5 * torch.randn(shape)).to(dtype) for _ in range(n_models)]
    base = b if with_base else None
    w = [0.3, 0.55, 0.2][:n_models]
    got = merge_tensors("multislerp", xs, base, backend=backend, weight=w, mergekit_compat=compat)
    want = ref(xs, base, MultislerpParams(tuple(w)), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"multislerp {backend} {dtype} {shape} n={n_models} base={with_base} compat={compat}")
