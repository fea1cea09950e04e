"""ram / ramplus_tl: hand-worked unique / shared / unchanged cases, the RAM+ scale, validation, backends."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.ram import RamParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

ram = get_method("ram").reference
plus = get_method("ramplus_tl").reference

# deltas from a zero base with ε = 0.5 (positions 0..5):
#   model 1: [ 1,   0.2, 2, 0,   -3, 0.9]   changed: 0, 2, 4, 5
#   model 2: [ 3,   0.3, 0, 0,    1, 0  ]   changed: 0, 4
#   model 3: [-1,   0,   0, 0.4,  5, 0  ]   changed: 0, 4      (0.4 ≤ ε: unchanged)
# counts c = [3, 0, 1, 0, 3, 1]: positions 2 and 5 are model 1's unique changes, 0 and 4 shared
X = [
    torch.tensor([1.0, 0.2, 2.0, 0.0, -3.0, 0.9]),
    torch.tensor([3.0, 0.3, 0.0, 0.0, 1.0, 0.0]),
    torch.tensor([-1.0, 0.0, 0.0, 0.4, 5.0, 0.0]),
]
ZERO = torch.zeros(6)


def test_ram_by_hand():
    # shared: (1 + 3 − 1)/3 = 1 and (−3 + 1 + 5)/3 = 1; unique: 2 and 0.9; sub-ε changes dropped
    out = ram(X, ZERO, RamParams(epsilon=0.5))
    assert torch.equal(out, torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.9]))


def test_ramplus_scales_unique_changes_by_shared_over_unique():
    # model 1: S = 2 shared (0, 4), U = 2 unique (2, 5): ρ = S/U = 1; models 2, 3 have no unique change.
    # r = 0.5, α = 5: λ1 = 1 + 0.5·1 = 1.5 (U/S would also give 1.5 here, so see the next case)
    out = plus(X, ZERO, RamParams(epsilon=0.5, plus=True, r=0.5, alpha=5.0))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 3.0, 0.0, 1.0, 1.35]), rtol=1e-7, atol=0)
    # drop model 1's position-5 change: S = 2, U = 1, ρ = 2 → λ1 = 1 + 0.5·2 = 2 (U/S would give 1.25)
    xs = [X[0].clone(), X[1], X[2]]
    xs[0][5] = 0.0
    out = plus(xs, ZERO, RamParams(epsilon=0.5, plus=True, r=0.5, alpha=5.0))
    assert torch.equal(out, torch.tensor([1.0, 0.0, 4.0, 0.0, 1.0, 0.0]))
    # defaults r = 0.1, α = 0.2: ρ = 2 is clipped to 0.2, λ1 = 1.02
    out = plus(xs, ZERO, RamParams(epsilon=0.5, plus=True))
    torch.testing.assert_close(out[2], torch.tensor(2.0 * 1.02), rtol=1e-7, atol=0)


def test_epsilon_is_a_strict_threshold():
    # |δ| = ε exactly is "unchanged": 0.5 is dropped, 0.5000001 is kept
    xs = [torch.tensor([0.5, 0.5000001])]
    out = ram(xs, torch.zeros(2), RamParams(epsilon=0.5))
    assert out.tolist() == [0.0, pytest.approx(0.5000001)]


def test_unchanged_identical_and_single_models():
    b = torch.randn(101)
    tiny = [b + 1e-6, b - 1e-6]  # all |δ| below ε = 1e-5: the base comes back exactly
    for f, p in ((ram, RamParams()), (plus, RamParams(plus=True))):
        assert torch.equal(f(tiny, b, p), b)
    x = b + 0.1 * torch.randn(101)
    torch.testing.assert_close(ram([x, x, x], b, RamParams()), x, rtol=0, atol=1e-6)  # shared: the mean
    # a single model: every change is unique and S = 0, so λ = 1 and RAM+ equals RAM equals the model
    torch.testing.assert_close(plus([x], b, RamParams(plus=True)), x, rtol=0, atol=1e-6)
    assert torch.equal(plus([x], b, RamParams(plus=True)), ram([x], b, RamParams()))


def test_epsilon_zero_and_an_unchanged_model_is_finite_in_default_mode():
    # model 2 leaves the tensor unchanged: S = U = 0 and mergekit computes ρ = 0/max(0, ε=0) = NaN, which
    # poisons every element; fastmerge's default mode sets λ = 1 there (it scales nothing)
    b = torch.randn(16)
    xs = [b + torch.randn(16), b.clone()]
    out = plus(xs, b, RamParams(epsilon=0.0, plus=True))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, xs[0], rtol=0, atol=1e-6)
    assert torch.isnan(plus(xs, b, RamParams(epsilon=0.0, plus=True), compat=True)).all()


def test_compat_rounds_epsilon_and_ramplus_result_is_float32():
    # bf16: 1e-5 rounds to 1.0013580322265625e-05. A δ of exactly that value is "changed" in fp32 math
    # (> 1e-5) but not in mergekit's bf16 comparison (equal)
    d = torch.tensor([1.0013580322265625e-05], dtype=torch.bfloat16)
    b = torch.zeros(1, dtype=torch.bfloat16)
    assert ram([b + d], b, RamParams()).item() == pytest.approx(1.0013580322265625e-05)
    assert ram([b + d], b, RamParams(), compat=True).item() == 0.0
    # mergekit's λ is a float32 tensor: RAM+ returns float32 for bf16 inputs (ram keeps bf16)
    x = torch.randn(8, dtype=torch.bfloat16)
    assert plus([x, x + 1], torch.zeros(8, dtype=torch.bfloat16), RamParams(plus=True), compat=True).dtype == torch.float32
    assert ram([x, x + 1], torch.zeros(8, dtype=torch.bfloat16), RamParams(), compat=True).dtype == torch.bfloat16


def test_parameters_validated():
    xs, b = [torch.randn(4)], torch.randn(4)
    with pytest.raises(ConfigError, match="epsilon"):
        merge_tensors("ram", xs, b, epsilon=-1e-5)
    with pytest.raises(ConfigError, match="epsilon"):
        merge_tensors("ramplus_tl", xs, b, epsilon=-1.0)
    with pytest.raises(ConfigError, match="alpha"):
        merge_tensors("ramplus_tl", xs, b, alpha=-0.1)
    with pytest.raises(ConfigError, match="has no parameter 'r'"):
        merge_tensors("ram", xs, b, r=0.1)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("ramplus_tl", xs)


def _runs(backend: str, method: str) -> None:
    skip_unless_runs(backend, get_method(method), RamParams())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 129), (3, 5, 11)])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, method, compat):
    _runs(backend, method)
    b = torch.randn(shape).to(dtype)
    # sparse changes (each model touches ~40% of the elements) so unique, shared and unchanged all occur
    xs = [(b.float() + 0.05 * torch.randn(shape) * (torch.rand(shape) < 0.4)).to(dtype) for _ in range(3)]
    if method == "ram":
        kw, p = dict(epsilon=0.01), RamParams(epsilon=0.01)
    else:
        kw, p = dict(epsilon=0.01, r=0.3, alpha=0.5), RamParams(epsilon=0.01, plus=True, r=0.3, alpha=0.5)
    got = merge_tensors(method, xs, b, backend=backend, mergekit_compat=compat, **kw)
    want = get_method(method).reference(xs, b, p, compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"{method} {backend} {dtype} {shape} compat={compat}")
