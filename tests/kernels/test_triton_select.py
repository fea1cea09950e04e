"""kernels/select.py: the radix select equals torch.kthvalue exactly (value, ties at the boundary, count)."""

import pytest
import torch

from helpers.kernel_cases import DTYPES, needs_triton, packed

pytestmark = needs_triton


def _ks(segs, T):
    # per model: the k of density 1/3, the minimum (k = n) and, for model 1, the maximum (k = 1)
    k = torch.zeros((segs.count, T, 2), dtype=torch.int64)
    for s, n in enumerate(segs.numel):
        for t in range(T):
            k[s, t, 0] = max(1, n // 3) if t != 1 else 1
            k[s, t, 1] = n
    return k


def _check(sel, x, base, segs, k, groups=None):
    for s, (a, n) in enumerate(zip(segs.start, segs.numel)):
        for t in range(x.shape[0]):
            mag = (x[t, a:a + n].float() - base[a:a + n].float()).abs().cpu()
            for q in range(k.shape[2]):
                kk = int(k[s, t, q])
                want = torch.kthvalue(mag, n - kk + 1).values
                got = sel.values[s, t, q].cpu()
                assert torch.equal(got, want), (s, t, q, got, want)
                # after the last pass: k = entries equal to it inside the top k; eq = entries equal to it
                assert int(sel.eq[s, t, q]) == int((mag == want).sum())
                assert int(sel.k[s, t, q]) == kk - int((mag > want).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", ["11", "8"])
def test_kth_largest_equals_kthvalue(dtype, schedule):
    """Both pass schedules: three passes of 11/11/9 bits (default) and four of 8/8/8/7."""
    from fastmerge.kernels.select import SCHEDULES, kth_largest

    x, base, segs = packed(dtype)
    k = _ks(segs, 3)
    sel = kth_largest(x, base, segs, k, passes=SCHEDULES[schedule])
    assert len(sel.schedule) == {"11": 3, "8": 4}[schedule]
    _check(sel, x, base, segs, k)


def test_default_schedule_from_the_environment(monkeypatch):
    from fastmerge.kernels.select import PASSES, PASSES_8, default_passes

    assert default_passes() == PASSES
    monkeypatch.setenv("FASTMERGE_SELECT_BITS", "8")
    assert default_passes() == PASSES_8
    monkeypatch.setenv("FASTMERGE_SELECT_BITS", "9")
    with pytest.raises(ValueError, match="FASTMERGE_SELECT_BITS"):
        default_passes()


def test_kth_largest_across_many_programs_and_chunks():
    """Small blocks (every segment spans programs) and one tensor fed as two chunks of one group."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.select import PASSES, Selection, kth_largest

    x, base, segs = packed(torch.float32, shapes=[(33, 17), (300,)])
    k = _ks(segs, 3)
    _check(kth_largest(x, base, segs, k, block=64), x, base, segs, k)
    # the 33x17 tensor as rows 0-19 and 20-32 (two launches, one histogram)
    sel = Selection.start(k[:1], x.device)
    for j in range(len(PASSES)):
        for r0, r1 in ((0, 20), (20, 33)):
            a, n = r0 * 17, (r1 - r0) * 17
            sel.histogram(j, x[:, a:a + n].contiguous(), base[a:a + n].contiguous(), Segments.packed([n], idx0=[a]),
                          groups=[0], block=128)
        sel.scan(j)
    one = Segments.packed([561])
    _check(sel, x[:, :561], base[:561], one, k[:1])
