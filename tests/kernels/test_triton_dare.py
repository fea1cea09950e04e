"""kernels/dare.py: DARE masks identical to the torch backend's for one seed, and the fused tail."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.methods import rng
from fastmerge.methods.base import ParamContext
from fastmerge.methods.dare import DareParams
from helpers.kernel_cases import DEV, assert_bits_equal, assert_close_ulps, check_rescale, needs_triton, packed, poisoned, reference

pytestmark = needs_triton


def _params(S, **kw):
    return [
        DareParams((0.5, -0.3, 1.1), (0.4, 1.0, 0.25), lambda_=0.7, seed=42, key=ParamContext(f"layers.{s}.w").key, **kw)
        for s in range(S)
    ]


@pytest.mark.parametrize("method,consensus", [("dare_linear", None), ("dare_ties", "sum")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dare_bit_exact_without_rescale(method, consensus, dtype):
    from fastmerge.kernels.dare import dare_merge

    x, base, segs = packed(dtype)
    params = _params(segs.count, rescale=False, normalize=consensus is not None)
    out = dare_merge(x, base, poisoned(segs.total, dtype), segs, params, consensus)
    assert_bits_equal(out, reference(method, x, base, segs, params, dtype), method)


@pytest.mark.parametrize("method,consensus", [("dare_linear", None), ("dare_ties", "sum")])
def test_dare_rescale(method, consensus):
    from fastmerge.kernels.dare import DareKernel

    x, base, segs = packed(torch.float32)
    params = _params(segs.count)  # rescale: true, the default
    keep = lambda s, t, d: (  # noqa: E731
        rng.keep_mask(42, params[s].key, t, params[s].density[t], d.shape) if params[s].density[t] < 1 else None
    )
    check_rescale(DareKernel(params, segs.numel, x.device, consensus), x, base, segs, keep, method, params, torch.float32)


def test_mask_is_the_generators_across_chunks_and_the_2_32_boundary():
    """One model, weight 1, no rescale: out ≠ base exactly where the mask keeps δ (random fp32 δ ≠ 0).
    Segments with idx0 = 2^32 − 100 (crossing 2^32) and 5·2^32 use the generator's 64-bit counter."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.dare import DareKernel

    g = torch.Generator().manual_seed(3)
    base = torch.randn(600, generator=g).to(DEV)
    x = (base.cpu() + torch.randn(600, generator=g)).to(DEV)[None]
    key = ParamContext("model.embed_tokens.weight").key
    p = [DareParams((1.0,), (0.3,), rescale=False, seed=7, key=key)]
    idx0 = [0, 2**32 - 100, 5 * 2**32]
    segs = Segments(start=(0, 200, 400), numel=(200, 200, 200), idx0=tuple(idx0))
    k = DareKernel(p * 3, segs.numel, DEV, None)
    out = k.merge(x, base, poisoned(600, torch.float32), segs)
    for s, i0 in enumerate(idx0):
        kept = (out[200 * s:200 * (s + 1)] != base[200 * s:200 * (s + 1)]).cpu()
        assert torch.equal(kept, rng.keep_mask(7, key, 0, 0.3, 200, start=i0)), i0


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_triton_backend_equals_torch_backend_for_one_seed(method):
    g = torch.Generator().manual_seed(5)
    b = torch.randn(37, 29, generator=g)
    xs = [(b + 0.01 * torch.randn(37, 29, generator=g)).bfloat16() for _ in range(3)]
    kw = dict(weight=[0.3, 0.5, 0.2], density=[0.5, 0.3, 0.9], seed=1234, tensor_name="model.layers.3.mlp.up_proj.weight")
    for rescale in (False, True):
        got = merge_tensors(method, xs, b.bfloat16(), backend="triton", rescale=rescale, **kw)
        want = merge_tensors(method, xs, b.bfloat16(), backend="torch", rescale=rescale, **kw)
        if rescale:  # the L1 ratio may differ by an fp32 ulp (summation order): ≤ 1 bf16 ulp, rarely
            assert_close_ulps(got, want, 1, 0.99, method)
        else:
            assert_bits_equal(got, want, method)
