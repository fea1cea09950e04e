"""passthrough: the input unchanged or scaled, exactly one model, base ignored, backends."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.config import MergeConfig
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.passthrough import PassthroughParams
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("passthrough")
ref = METHOD.reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_default_scale_returns_the_input_bit_for_bit(dtype):
    # mergekit's default scale is None ("unchanged"); fastmerge's 1.0 gives the same bits
    x = torch.randn(3, 17).to(dtype)
    x[0, 0] = -0.0
    assert_bitwise_equal(merge_tensors("passthrough", [x]), x, f"passthrough {dtype}")
    assert_bitwise_equal(merge_tensors("passthrough", [x], mergekit_compat=True), x, f"passthrough compat {dtype}")


def test_scale_by_hand():
    x = torch.tensor([1.0, -2.0, 0.75, 3.0])
    assert merge_tensors("passthrough", [x], scale=0.5).tolist() == [0.5, -1.0, 0.375, 1.5]
    assert merge_tensors("passthrough", [x], scale=[-2.0]).tolist() == [-2.0, 4.0, -1.5, -6.0]
    assert merge_tensors("passthrough", [x], scale=0.0).tolist() == [0.0, -0.0, 0.0, 0.0]


def test_base_is_ignored():
    x, b = torch.randn(9), torch.randn(9)
    assert torch.equal(merge_tensors("passthrough", [x], b, out_dtype=torch.float32), x)
    assert METHOD.base_policy == "ignored"


def test_exactly_one_model():
    with pytest.raises(ConfigError, match="exactly one"):
        merge_tensors("passthrough", [torch.randn(4), torch.randn(4)])
    with pytest.raises(ConfigError, match="at most 1"):
        MergeConfig.from_dict({"merge_method": "passthrough", "models": [{"model": "x"}, {"model": "y"}]})
    with pytest.raises(ConfigError, match="scale"):
        merge_tensors("passthrough", [torch.randn(4)], scale="big")


def _runs(backend: str) -> None:
    skip_unless_runs(backend, METHOD, PassthroughParams())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 129), (3, 5, 11)])
@pytest.mark.parametrize("scale", [1.0, 0.3, -1.7])
def test_backend_matches_reference(backend, dtype, shape, scale):
    _runs(backend)
    x = torch.randn(shape).to(dtype)
    got = merge_tensors("passthrough", [x], backend=backend, scale=scale)
    assert_bitwise_equal(got, ref([x], None, PassthroughParams((scale,))).to(dtype), f"passthrough {backend} {dtype}")
    # torch multiplies a bf16/fp16 tensor by a scalar in fp32 and rounds once: compat gives the same bits
    # (compat mode is the torch backend's alone)
    compat = merge_tensors("passthrough", [x], backend="torch", scale=scale, mergekit_compat=True)
    assert_bitwise_equal(compat, got, f"passthrough compat vs default {backend} {dtype}")
