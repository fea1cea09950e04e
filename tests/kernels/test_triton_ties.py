"""kernels/ties.py: fused TIES (selection + consensus pass) against methods/ties.py's reference."""

import pytest
import torch

from fastmerge.methods.ties import TiesParams
from helpers.kernel_cases import (
    DTYPES, assert_bits_equal, assert_close_ulps, check_rescale, needs_triton, packed, poisoned, reference,
)

pytestmark = needs_triton


def _params(S, **kw):
    # per tensor: different densities (1.0 = kept whole), weights (one negative), λ
    dens = [(0.4, 1.0, 0.25), (0.5, 0.5, 0.5), (0.3, 0.9, 0.05), (0.2, 0.7, 1.0)]
    return [TiesParams((0.5, -0.3, 1.1), dens[s % 4], lambda_=1.0 + 0.1 * s, **kw) for s in range(S)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_bit_exact(dtype, selection):
    from fastmerge.kernels.ties import ties_merge

    x, base, segs = packed(dtype)
    params = _params(segs.count, selection=selection)
    out = ties_merge(x, base, poisoned(segs.total, dtype), segs, params)
    assert_bits_equal(out, reference("ties", x, base, segs, params, dtype), f"ties {selection} {dtype}")


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_with_the_8_bit_schedule(monkeypatch, selection):
    """FASTMERGE_SELECT_BITS=8: four selection passes inside the kernel's pass protocol, same bits."""
    from fastmerge.kernels.ties import TiesKernel, ties_merge

    monkeypatch.setenv("FASTMERGE_SELECT_BITS", "8")
    x, base, segs = packed(torch.bfloat16)
    params = _params(segs.count, selection=selection)
    assert TiesKernel(params, segs.numel, x.device).n_passes >= 4
    out = ties_merge(x, base, poisoned(segs.total, torch.bfloat16), segs, params)
    assert_bits_equal(out, reference("ties", x, base, segs, params, torch.bfloat16), f"ties 8-bit {selection}")


def test_ties_count_election_no_normalize_fp32_out():
    from fastmerge.kernels.ties import ties_merge

    x, base, segs = packed(torch.bfloat16)
    params = _params(segs.count, election="count", normalize=False)
    out = ties_merge(x, base, poisoned(segs.total, torch.float32), segs, params)
    assert_bits_equal(out, reference("ties", x, base, segs, params, torch.float32), "ties count")


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_rescale(selection):
    from fastmerge.kernels.ties import TiesKernel
    from fastmerge.methods.ties import trim_mask

    x, base, segs = packed(torch.float32)
    params = _params(segs.count, rescale=True, selection=selection)
    keep = lambda s, t, d: trim_mask(d, params[s].density[t], selection) if params[s].density[t] < 1 else None  # noqa: E731
    check_rescale(TiesKernel(params, segs.numel, x.device), x, base, segs, keep, "ties", params, torch.float32)


def test_ties_rescale_bf16_end_to_end():
    """bf16 outputs: the ratio's last-bit differences flip at most a rounding tie (≤ 1 bf16 ulp, rare)."""
    from fastmerge.kernels.ties import ties_merge

    x, base, segs = packed(torch.bfloat16)
    params = _params(segs.count, rescale=True)
    out = ties_merge(x, base, poisoned(segs.total, torch.bfloat16), segs, params)
    assert_close_ulps(out, reference("ties", x, base, segs, params, torch.bfloat16), 1, 0.99, "ties rescale")


def test_ties_topk_ties_ranked_across_programs_and_chunks():
    """Exact-k with the tied run of |δ| spread over two programs (block 64), then the same tensor
    merged as two row chunks (the tied entries' ranks continue from chunk to chunk)."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.ties import TiesKernel, ties_merge

    x, base, segs = packed(torch.bfloat16, shapes=[(33, 17)])
    params = [TiesParams((0.5, -0.3, 1.1), (0.4, 0.13, 0.25), selection="topk")]
    want = reference("ties", x, base, segs, params, torch.bfloat16)
    assert_bits_equal(ties_merge(x, base, poisoned(561, torch.bfloat16), segs, params, block=64), want, "topk blocks")
    k = TiesKernel(params, [561], x.device)
    chunks = [(0, 6 * 17), (6 * 17, 27 * 17)]  # the tied run (entries 50-119) straddles the cut
    for j in range(k.n_passes):
        for a, n in chunks:
            k.data_pass(j, x[:, a:a + n].contiguous(), base[a:a + n].contiguous(), Segments.packed([n], idx0=[a]), [0], block=64)
        k.end_pass(j)
    out = poisoned(561, torch.bfloat16)
    for a, n in chunks:
        k.merge(x[:, a:a + n].contiguous(), base[a:a + n].contiguous(), out[a:a + n], Segments.packed([n], idx0=[a]), [0], block=64)
    assert_bits_equal(out, want, "topk chunks")
