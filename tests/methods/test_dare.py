"""dare_linear / dare_ties: hand-worked cases, the mask = the generator's, the L1 rescale rule, keep-rate
statistics, validation, then every backend against the reference."""

import math

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method, rng
from fastmerge.methods.base import ParamContext
from fastmerge.methods.dare import DareParams, dare_compat
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
from fastmerge.methods.ties import TiesParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

linear = get_method("dare_linear").reference
ties = get_method("dare_ties").reference
X = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, -1.0, 2.0, 4.0]), torch.tensor([2.0, 3.0, -5.0, 1.0])]
ZERO = torch.zeros(4)


def params(n, weight, density, **kw) -> DareParams:
    as_t = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
    return DareParams(as_t(weight), as_t(density), **kw)


def test_defaults_follow_mergekit():
    for name, consensus in (("dare_linear", None), ("dare_ties", "sum")):
        m = get_method(name)
        specs = m.param_specs()
        assert specs["normalize"].default is False and specs["rescale"].default is True
        assert specs["density"].default == 1.0 and specs["lambda"].default == 1.0 and "int8_mask" in specs
        assert m.base_policy == "required"
        p = m.make_params({"weight": [1.0], "density": [0.5]},
                          {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False},
                          ParamContext("model.layers.0.mlp.up_proj.weight", 42))
        assert m.consensus == consensus and p.seed == 42
        assert p.key == ParamContext("model.layers.0.mlp.up_proj.weight").key


def test_density_one_dare_ties_is_a_weighted_sum_of_agreeing_entries_by_hand():
    # wδ columns: [1,-1,2] sum 2 -> +: 1+2; [-2,-1,3] sum 0 -> + (zero elects +): 3; [3,2,-5] sum 0 -> +: 3+2;
    # [0.5,4,1] -> all: 5.5
    out = ties(X, ZERO, params(3, 1.0, 1.0))
    assert torch.equal(out, torch.tensor([3.0, 3.0, 5.0, 5.5]))
    # normalize: true divides by the agreeing weights: [3/2, 3/1, 5/2, 5.5/3]
    out = ties(X, ZERO, params(3, 1.0, 1.0, normalize=True))
    assert torch.equal(out, torch.tensor([1.5, 3.0, 2.5, 5.5 / 3]))


def test_density_one_dare_linear_is_task_arithmetic_bit_for_bit():
    b = torch.randn(1000)
    xs = [b + 0.1 * torch.randn(1000) for _ in range(3)]
    w = (0.3, -0.2, 0.9)
    for normalize, lam in ((False, 1.0), (True, 0.6)):
        want = get_method("task_arithmetic").reference(xs, b, TaskArithmeticParams(w, normalize, lam))
        assert_bitwise_equal(linear(xs, b, params(3, w, 1.0, normalize=normalize, lambda_=lam)), want, "dare_linear d=1")


def test_density_one_dare_ties_is_ties_without_trim():
    b = torch.randn(1000)
    xs = [b + 0.1 * torch.randn(1000) for _ in range(3)]
    w = (0.3, 0.5, 0.9)
    want = get_method("ties").reference(xs, b, TiesParams(w, (1.0,) * 3, normalize=False))
    assert_bitwise_equal(ties(xs, b, params(3, w, 1.0)), want, "dare_ties d=1")


def test_mask_is_the_generators_and_rescale_is_the_l1_ratio():
    n = 999
    b = torch.randn(n)
    x = b + torch.randn(n)
    delta = x - b
    seed, key = 5, ParamContext("t").key
    keep = rng.keep_mask(seed, key, 0, 0.3, n)
    # without rescale: exactly the kept entries
    out = linear([x], b, params(1, 0.5, 0.3, rescale=False, seed=seed, key=key))
    assert torch.equal(out, b + torch.where(keep, 0.5 * delta, 0.0))
    # with rescale: kept entries times ||δ||₁ / ||kept δ||₁ (not 1/density)
    factor = delta.abs().sum() / torch.where(keep, delta, 0.0).abs().sum()
    assert abs(float(factor) - 1 / 0.3) > 1e-3
    out = linear([x], b, params(1, 1.0, 0.3, seed=seed, key=key))
    assert torch.allclose(out - b, torch.where(keep, delta * factor, 0.0), atol=1e-5)
    # the L1 norm of the kept, rescaled task vector equals the original's
    assert torch.allclose((out - b).abs().sum(), delta.abs().sum(), rtol=1e-5)


def test_model_index_selects_the_stream():
    n = 4000
    b = torch.zeros(n)
    xs = [torch.ones(n), torch.ones(n)]
    out = linear(xs, b, params(2, (1.0, 2.0), 0.5, rescale=False, seed=1, key=2))
    want = rng.keep_mask(1, 2, 0, 0.5, n).float() + 2 * rng.keep_mask(1, 2, 1, 0.5, n).float()
    assert torch.equal(out, want)


def test_no_rescale_when_the_kept_norm_is_below_1e_7():
    b = torch.zeros(64)
    x = torch.full((64,), 1e-10)  # ||δ||₁ = 6.4e-9 < 1e-7: mergekit leaves the masked delta as is
    out = linear([x], b, params(1, 1.0, 0.5, seed=3, key=4))
    assert torch.equal(out, torch.where(rng.keep_mask(3, 4, 0, 0.5, 64), x, 0.0))


def test_seed_and_tensor_name_change_the_mask():
    b = torch.randn(512)
    xs = [b + torch.randn(512) for _ in range(2)]
    kw = dict(weight=0.5, density=0.5)
    a = merge_tensors("dare_ties", xs, b, seed=1, tensor_name="a", **kw)
    assert torch.equal(a, merge_tensors("dare_ties", xs, b, seed=1, tensor_name="a", **kw))
    assert not torch.equal(a, merge_tensors("dare_ties", xs, b, seed=2, tensor_name="a", **kw))
    assert not torch.equal(a, merge_tensors("dare_ties", xs, b, seed=1, tensor_name="b", **kw))


@pytest.mark.parametrize("density", [0.1, 0.33, 0.9])
def test_keep_rate_within_5_sigma(density):
    # each model keeps ~ Binomial(n, density): sd of the rate sqrt(d(1-d)/n)
    n = 1 << 18
    b = torch.zeros(n)
    xs = [torch.ones(n), torch.full((n,), 2.0)]
    out = linear(xs, b, params(2, (1.0, 4.0), density, rescale=False, seed=9, key=10))
    kept0 = (out == 1) | (out == 9)
    kept1 = (out == 8) | (out == 9)
    for k in (kept0, kept1):
        assert abs(k.float().mean().item() - density) <= 5 * math.sqrt(density * (1 - density) / n)


def test_compat_uses_mergekits_work_dtype_and_rounded_density():
    n = 1 << 14
    delta = (0.01 * torch.randn(n)).bfloat16()
    got = dare_compat(delta, 0.33, False, 4, 5, 1)
    # bf16 work dtype: the keep probability is bf16(0.33) = 0.330078125
    keep = rng.keep_mask(4, 5, 1, 0.330078125, n)
    assert torch.equal(got, delta * keep.bfloat16())
    # fp16 runs in fp32 (torch.bernoulli has no fp16 CPU kernel): p = fp32(0.33)
    d16 = delta.half()
    assert torch.equal(dare_compat(d16, 0.33, False, 4, 5, 1), d16 * rng.keep_mask(4, 5, 1, 0.33, n).half())
    # rescale in bf16: the norms and their ratio round to bf16
    resc = dare_compat(delta, 0.33, True, 4, 5, 1)
    masked = delta * keep.bfloat16()
    assert torch.equal(resc, masked * (delta.abs().sum() / masked.abs().sum()))


def test_compat_mode_output_dtype_and_density_one():
    b = torch.randn(100).bfloat16()
    xs = [(b.float() + 0.05 * torch.randn(100)).bfloat16() for _ in range(2)]
    out = linear(xs, b, params(2, 0.5, 1.0), compat=True)
    assert out.dtype == torch.bfloat16
    w = torch.tensor([0.5, 0.5], dtype=torch.bfloat16).view(-1, 1)
    assert torch.equal(out, (b + (torch.stack([x - b for x in xs]) * w).sum(0)).bfloat16())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_validated(density):
    with pytest.raises(ConfigError, match="density"):
        merge_tensors("dare_ties", [torch.randn(4)], torch.randn(4), weight=1.0, density=density)


def test_zero_weight_sum_with_normalize_rejected_without_consensus():
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_tensors("dare_linear", [torch.randn(4)] * 2, torch.randn(4), weight=[1.0, -1.0], density=0.5, normalize=True)
    # with consensus the divisor is per element (agreeing weights) and a zero one becomes 1, as in mergekit
    merge_tensors("dare_ties", [torch.randn(4)] * 2, torch.randn(4), weight=[1.0, -1.0], density=0.5, normalize=True)


def test_base_required():
    with pytest.raises(ConfigError, match="base"):
        merge_tensors("dare_linear", [torch.randn(4)], weight=1.0)


def _runs(backend: str, method: str, compat: bool) -> None:
    p = params(3, [0.3, 0.5, 0.4], [0.5, 0.3, 1.0], lambda_=0.9, seed=11, key=ParamContext("w").key)
    skip_unless_runs(backend, get_method(method), p, compat)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (2**16 + 3,)])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, method, dtype, shape, compat):
    _runs(backend, method, compat)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(shape)).to(dtype) for _ in range(3)]
    w, d = [0.3, 0.5, 0.4], [0.5, 0.3, 1.0]
    got = merge_tensors(method, xs, b, backend=backend, mergekit_compat=compat, seed=11, tensor_name="w",
                        weight=w, density=d, **{"lambda": 0.9})
    p = params(3, w, d, lambda_=0.9, seed=11, key=ParamContext("w").key)
    assert_bitwise_equal(got, get_method(method).reference(xs, b, p, compat=compat).to(dtype), f"{method} {backend}")
