"""arcee_fusion: hand-worked quantiles / row-wise KL / outlier mask, sampling, validation, backends."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.config import MergeConfig
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.arcee_fusion import SAMPLE_SIZE, ArceeFusionParams, quartiles
from fastmerge.methods.base import ParamContext
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("arcee_fusion")
ref = METHOD.reference
P = ArceeFusionParams()


def test_quartiles_are_order_statistics_without_interpolation():
    # n = 10, last = 9: indices ⌊9/4⌋ = 2, ⌊9/2⌋ = 4, ⌊27/4⌋ = 6 (torch.quantile would give 2.25, 4.5, 6.75)
    vals = torch.tensor([9.0, 0.0, 8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])
    assert [float(q) for q in quartiles(vals, P)] == [2.0, 4.0, 6.0]
    assert [float(q) for q in quartiles(torch.tensor([5.0]), P)] == [5.0, 5.0, 5.0]


def test_outlier_mask_by_hand_1d():
    # a 1-D tensor is one softmax row: KL is one positive scalar K, so imp = K·|δ| keeps the order of |δ|.
    # |δ| sorted = 1..8, 100 (n = 9, last = 8): Q1 = 3, median = 5, Q3 = 7 → threshold K·(5 + 1.5·4) = 11K:
    # only the −100 change survives
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, -100.0])
    b = torch.zeros(9)
    out = ref([b + delta], b, P)
    assert torch.equal(out, torch.tensor([0.0] * 8 + [-100.0]))


def test_kl_is_row_wise():
    # row 0 is shifted by a constant (softmax-invariant): KL = 0, so imp = 0 there although |δ| = 1.
    # row 1: KL = K > 0, imp = K·[0.01, 0.02, 0.05, 3]. Sorted imp: 0,0,0,0, .01K,.02K,.05K,3K (last = 7):
    # Q1 = [1] = 0, median = [3] = 0, Q3 = [5] = .02K → threshold .03K: keeps 0.05 and 3 of row 1, and
    # nothing of row 0 (a whole-tensor softmax would give row 0 imp = K·1 and keep it)
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.01, 0.02, 0.05, 3.0]])
    out = ref([x], b, P)
    want = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.05, 3.0]])
    assert torch.equal(out, want)


def test_identical_model_gives_the_base_and_zero_threshold_keeps_everything():
    b = torch.randn(5, 9)
    assert torch.equal(ref([b.clone()], b, P), b)
    # only one row changed (by a non-constant δ): most imp are 0, so Q1 = median = Q3 = 0 and the
    # threshold 0 keeps every element: the output is the fine-tune
    x = b.clone()
    x[2] += torch.linspace(-1, 1, 9)
    torch.testing.assert_close(ref([x], b, P), x, rtol=0, atol=1e-6)


def test_large_tensors_sample_deterministically():
    n = SAMPLE_SIZE + 12_345
    vals = torch.rand(n, generator=torch.Generator().manual_seed(7))
    p1 = METHOD.make_params({}, {}, ParamContext("model.layers.0.mlp.up_proj.weight", seed=0))
    p2 = METHOD.make_params({}, {}, ParamContext("model.layers.0.mlp.up_proj.weight", seed=1))
    a, again, other = quartiles(vals, p1), quartiles(vals, p1), quartiles(vals, p2)
    assert all(torch.equal(u, v) for u, v in zip(a, again))  # same (seed, tensor name): same samples
    assert any(not torch.equal(u, v) for u, v in zip(a, other))  # another seed: other samples
    # 1e6 samples of U(0, 1): each quartile within ~0.002 of 1/4, 1/2, 3/4 (its standard error is 4e-4)
    for q, f in zip(a, (0.25, 0.5, 0.75)):
        assert abs(float(q) - f) < 0.002


def test_exactly_one_model_besides_the_base():
    b = torch.randn(4)
    with pytest.raises(ConfigError, match="exactly one"):
        merge_tensors("arcee_fusion", [torch.randn(4), torch.randn(4)], b)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("arcee_fusion", [torch.randn(4)])
    with pytest.raises(ConfigError, match="at most 1"):
        MergeConfig.from_dict({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]})


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 129), (3, 5, 11)])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, compat):
    _runs(backend)
    b = torch.randn(shape).to(dtype)
    x = (b.float() + 0.05 * torch.randn(shape)).to(dtype)
    got = merge_tensors("arcee_fusion", [x], b, backend=backend, mergekit_compat=compat, tensor_name="w", seed=3)
    p = METHOD.make_params({}, {}, ParamContext("w", 3))
    want = ref([x], b, p, compat=compat)
    # compat reproduces mergekit's float32 result (its issue #604); the engine writes the requested dtype
    assert want.dtype == torch.float32
    assert_bitwise_equal(got, want.to(dtype), f"arcee_fusion {backend} {dtype} {shape} compat={compat}")
    # every element is the base's or base + δ (δ rounded to the compute dtype in compat, as mergekit)
    delta = (x - b).float() if compat else x.float() - b.float()
    assert ((got == b) | (got == (b.float() + delta).to(dtype))).all()
