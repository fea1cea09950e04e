"""kernels/select_bracket.py: the one-read selection (sample → bracket → count → select among candidates,
radix fallback) equals torch.kthvalue and the CPU kernel (``_C.kth_largest_abs_diff_multi``) exactly: value
bits, entries above and equal to it, NaN count, remaining rank; on random data, adversarial data (> 50 %
zero deltas, 16 distinct values, ≥ k NaN, ±inf, all equal, 1 element, sizes not a multiple of 8), k = 1,
k = n, inactive queries, bf16/fp16/fp32, several models, two queries per model; with the fallback forced;
through the TIES and breadcrumbs kernels on NaN-poisoned outputs.

The default sizes sample only tensors above 65536 elements (each interpreted program costs ~40 ms here),
so the tests shrink them (``CFG``): a 561-element tensor is sampled in 8 chunks of 16."""

import math

import pytest
import torch

from helpers.kernel_cases import DEV, DTYPES, assert_bits_equal, needs_triton, packed, poisoned, reference

pytestmark = needs_triton

SHAPES = [(1,), (7,), (33, 17), (3, 4, 25), (50, 41)]


def _cfg(**kw):
    from fastmerge.kernels.select_bracket import BracketConfig

    return BracketConfig(**{**dict(direct=64, chunk=16, every=64, slack=8), **kw})


def _ks(segs, T, inactive=True):
    """Per model: [density 1/3 (model 1: k = 1), k = n]; model T−1 of the second segment inactive (k = 0)."""
    k = torch.zeros((segs.count, T, 2), dtype=torch.int64)
    for s, n in enumerate(segs.numel):
        for t in range(T):
            k[s, t, 0] = max(1, n // 3) if t != 1 else 1
            k[s, t, 1] = n
    if inactive and segs.count > 1:
        k[1, T - 1] = 0
    return k


def _expected(mag: torch.Tensor, kk: int) -> tuple[int, int, int, int]:
    """(value bits, #above, #equal, #NaN) of the kk-th largest of ``mag`` by torch.kthvalue."""
    n = mag.numel()
    bits = mag.view(torch.int32)
    vb = int(torch.kthvalue(mag, n - kk + 1).values.view(torch.int32))
    return vb, int((bits > vb).sum()), int((bits == vb).sum()), int(mag.isnan().sum())


def _cpu_kernel(x, base, a, n, models, ks):
    """The CPU selection (csrc/cpu/select.cpp) of one segment: [(value, above, equal, nan)]."""
    from fastmerge import _native

    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    xs = [x[t, a:a + n].cpu().contiguous() for t in range(x.shape[0])]
    b = base[a:a + n].cpu().contiguous()
    res, _ = _native._C.kth_largest_abs_diff_multi(
        [v.data_ptr() for v in xs], [code[v.dtype] for v in xs], b.data_ptr(), code[b.dtype], n, models, ks, 1,
    )
    return res


def check(sel, x, base, segs, k, cpu=True):
    """Every active query against kthvalue, and against the CPU kernel (which takes 1 ≤ k ≤ n)."""
    for s, (a, n) in enumerate(zip(segs.start, segs.numel)):
        active = [(t, q) for t in range(x.shape[0]) for q in range(k.shape[2]) if int(k[s, t, q]) >= 1]
        cpu_res = _cpu_kernel(x, base, a, n, [t for t, _ in active], [int(k[s, t, q]) for t, q in active]) if cpu else None
        for i, (t, q) in enumerate(active):
            mag = (x[t, a:a + n].float() - base[a:a + n].float()).abs().cpu()
            kk = int(k[s, t, q])
            vb, above, equal, nans = _expected(mag, kk)
            got = int(sel.values[s, t, q].cpu().view(torch.int32))
            where = f"segment {s} (n={n}) model {t} query {q} k={kk}"
            assert int(sel.nan[s, t]) == nans, f"{where}: NaN {int(sel.nan[s, t])} vs {nans}"
            if vb > 0x7F800000:
                # the k-th largest is a NaN: which NaN bit pattern, and so how many keys share it, depends on the
                # arithmetic (x86 keeps an input NaN's payload, NVIDIA GPUs return 0x7FFFFFFF); every NaN
                # threshold keeps nothing (|δ| ≥ NaN is false), so "a NaN" is the whole specification
                assert got > 0x7F800000, f"{where}: value bits {got:#x}, kthvalue a NaN ({vb:#x})"
                continue
            assert got == vb, f"{where}: value bits {got:#x}, kthvalue {vb:#x}"
            assert int(sel.eq[s, t, q]) == equal, f"{where}: equal {int(sel.eq[s, t, q])} vs {equal}"
            assert int(sel.k[s, t, q]) == kk - above, f"{where}: remaining rank {int(sel.k[s, t, q])} vs {kk - above}"
            if cpu:
                cv, ca, ce, cn = cpu_res[i]
                v = torch.tensor([got], dtype=torch.int32).view(torch.float32).item()
                assert (v == cv or (math.isnan(v) and math.isnan(cv))) and (ca, ce, cn) == (above, equal, nans), where


@pytest.mark.parametrize("dtype", DTYPES)
def test_bracket_equals_kthvalue_and_the_cpu_kernel(dtype):
    from fastmerge.kernels.select import kth_largest

    x, base, segs = packed(dtype, shapes=SHAPES, seed=1)
    k = _ks(segs, 3)
    sel = kth_largest(x, base, segs, k, config=_cfg())
    assert sel.bracketed and sel.plan.nchunk[2] > 0 and sel.plan.nchunk[4] > 0  # sampled, not only direct
    check(sel, x, base, segs, k)
    if dtype == torch.float32:  # distinct random values: every bracket holds its k-th largest
        assert int(sel.fallbacks.sum()) == 0, sel.fallbacks
        assert int(sel.need.sum()) == 0  # so the radix passes read nothing


def test_default_sizes_select_small_tensors_directly():
    """Default config: tensors ≤ 65536 elements skip the sample; every key is a candidate."""
    from fastmerge.kernels.select import kth_largest

    x, base, segs = packed(torch.bfloat16, T=2, shapes=[(7,), (33, 17)], seed=2)
    k = _ks(segs, 2, inactive=False)
    sel = kth_largest(x, base, segs, k)
    assert sel.bracketed and sel.plan.nchunk == [0, 0] and int(sel.fallbacks.sum()) == 0
    assert sel.result.inside.view(2, 2, 2)[1].tolist() == [[561, 561], [561, 561]]
    check(sel, x, base, segs, k)


def _adversarial(dtype):
    """Segments whose |δ| are: > 50 % exactly 0; 16 distinct values; ≥ k NaN (the k-th largest is NaN); ±inf;
    all equal; one element; 5 elements (not a multiple of 8)."""
    from fastmerge.kernels._common import Segments

    g = torch.Generator().manual_seed(7)
    T, parts, bases = 3, [], []
    sizes = [400, 333, 300, 257, 200, 1, 5]
    for si, n in enumerate(sizes):
        b = torch.randn(n, generator=g)
        x = b[None] + 0.01 * torch.randn(T, n, generator=g)
        if si == 0:
            x[:, : int(0.6 * n)] = b[: int(0.6 * n)]  # 60 % zero deltas
        elif si == 1:
            x = b[None] + (torch.randint(0, 16, (T, n), generator=g).float() - 8) * 0.25  # 16 distinct values
        elif si == 2:
            x[:, ::2] = float("nan")  # 150 NaN deltas: k = n/3 = 100 selects a NaN
        elif si == 3:
            x[:, :40] = float("inf")
            x[:, 40:60] = float("-inf")
        elif si == 4:
            x = (b + 0.5)[None].repeat(T, 1)  # |δ| all 0.5 up to the rounding of b + 0.5: few values, many ties
        parts.append(x)
        bases.append(b)
    xx, bb = torch.cat(parts, 1), torch.cat(bases)
    if dtype != torch.float32:  # keep the special values: round x and base, then place them again
        xx = xx.to(dtype)
    return xx.to(DEV), bb.to(dtype).to(DEV), Segments.packed(sizes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bracket_on_adversarial_data(dtype):
    from fastmerge.kernels.select import kth_largest

    x, base, segs = _adversarial(dtype)
    k = _ks(segs, 3, inactive=False)
    sel = kth_largest(x, base, segs, k, config=_cfg())
    check(sel, x, base, segs, k)
    # the NaN segment: ≥ k NaN deltas, the k-th largest is a NaN (the merge then keeps nothing)
    assert torch.isnan(sel.values[2, 0, 0]).item()


def test_zero_heavy_tensor_collapses_the_bracket_on_zero():
    """> 50 % of |δ| exactly 0 and k inside them: the sample brackets [0, 0]; the count pass counts the
    zeros without storing them and no query falls back."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.select import kth_largest

    g = torch.Generator().manual_seed(3)
    n = 640
    b = torch.randn(n, generator=g)
    x = b[None] + 0.01 * torch.randn(2, n, generator=g)
    x[:, : 3 * n // 4] = b[: 3 * n // 4]
    segs = Segments.packed([n])
    k = torch.tensor([[[n // 2], [n // 2]]], dtype=torch.int64)
    sel = kth_largest(x.to(DEV), b.to(DEV), segs, k, config=_cfg())
    r = sel.result
    assert r.lo.tolist() == [0, 0] and r.hi.tolist() == [0, 0], (r.lo, r.hi)
    assert int(sel.fallbacks.sum()) == 0
    check(sel, x.to(DEV), b.to(DEV), segs, k)


@pytest.mark.parametrize("how", ["missed", "overflow"])
def test_forced_fallback_is_exact(how):
    """A bracket that misses (no margin, so the k-th largest is outside it for most queries) or candidates
    that overflow their region (no headroom): the radix passes answer those queries, exactly."""
    from fastmerge.kernels.select import kth_largest

    x, base, segs = packed(torch.bfloat16, shapes=SHAPES, seed=4)
    k = _ks(segs, 3)
    cfg = _cfg(z=-3.0) if how == "missed" else _cfg(headroom=0.0, slack=0)
    sel = kth_largest(x, base, segs, k, config=cfg)
    assert int(sel.fallbacks.sum()) > 0
    if how == "overflow":
        r = sel.result
        assert bool(((r.inside > torch.tensor(sel.plan.cap, device=r.inside.device)) & (r.lo != r.hi)).any())
    check(sel, x, base, segs, k)


def test_row_chunks_take_the_radix_passes():
    """A tensor fed as two row chunks is not whole in any launch: the three radix passes select it."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.select import PASSES, Selection

    x, base, segs = packed(torch.float32, shapes=[(33, 17)], seed=5)
    k = _ks(segs, 3, inactive=False)
    sel = Selection.start(k, x.device, numel=[561], config=_cfg())
    for j in range(len(PASSES)):
        for r0, r1 in ((0, 20), (20, 33)):
            a, n = r0 * 17, (r1 - r0) * 17
            sel.histogram(j, x[:, a:a + n].contiguous(), base[a:a + n].contiguous(), Segments.packed([n], idx0=[a]),
                          groups=[0], block=128)
        sel.scan(j)
    assert not sel.bracketed
    check(sel, x, base, segs, k)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_ties_kernel_on_the_bracket(monkeypatch, selection):
    """TIES through the bracket (sampled: small config), NaN-poisoned output, bit-exact vs the reference."""
    from fastmerge.kernels import select_bracket as sb
    from fastmerge.kernels.ties import TiesKernel, ties_merge
    from fastmerge.methods.ties import TiesParams

    monkeypatch.setattr(sb, "DEFAULT", _cfg())
    x, base, segs = packed(torch.bfloat16, shapes=SHAPES, seed=6)
    params = [TiesParams((0.3, -0.2, 0.6), (0.3, 0.2, 1.0), selection=selection) for _ in SHAPES]
    kern = TiesKernel(params, segs.numel, x.device)
    out = poisoned(x.shape[1], torch.bfloat16)
    kern.run(x, base, out, segs)
    assert kern.sel.bracketed and kern.sel.plan.nchunk[4] > 0
    assert_bits_equal(out, reference("ties", x, base, segs, params, torch.bfloat16), f"ties {selection}")
    out2 = poisoned(x.shape[1], torch.bfloat16)
    ties_merge(x, base, out2, segs, params)
    assert_bits_equal(out2, out, "ties_merge")


def test_breadcrumbs_kernel_on_the_bracket(monkeypatch):
    """Two queries per model (the band's bounds) from one count pass."""
    from fastmerge.kernels import select_bracket as sb
    from fastmerge.kernels.breadcrumbs import BreadcrumbsKernel
    from fastmerge.methods.breadcrumbs import BreadcrumbsParams

    monkeypatch.setattr(sb, "DEFAULT", _cfg())
    x, base, segs = packed(torch.float16, shapes=SHAPES, seed=8)
    params = [BreadcrumbsParams(weight=(0.3, 0.5, 0.2), density=(0.5, 0.3, 0.9), gamma=(0.05, 0.1, 0.0)) for _ in SHAPES]
    kern = BreadcrumbsKernel(params, segs.numel, x.device, None)
    out = poisoned(x.shape[1], torch.float16)
    kern.run(x, base, out, segs)
    assert kern.sel.bracketed and kern.sel.queries_per_model == 2
    assert_bits_equal(out, reference("breadcrumbs", x, base, segs, params, torch.float16), "breadcrumbs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("zeros", [0.0, 0.6])
def test_bracket_on_the_gpu_at_default_sizes_without_a_host_sync(zeros):
    """Compiled kernels, default sizes (a 2^20-element tensor is sampled: 512 chunks of 128): equal to the
    radix passes and kthvalue; the second call (tables cached) runs with synchronising calls turned into errors."""
    from fastmerge.kernels._common import Segments
    from fastmerge.kernels.select import PASSES, kth_largest

    n, T = 1 << 20, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    base = (0.02 * torch.randn(n, device="cuda", generator=g)).bfloat16()
    x = (base.float()[None] + 0.002 * torch.randn(T, n, device="cuda", generator=g)).bfloat16()
    x[:, : int(zeros * n)] = base[: int(zeros * n)]
    segs = Segments.packed([n])
    k = torch.tensor([[[int(0.3 * n), n // 2]] * T], dtype=torch.int64)
    kth_largest(x, base, segs, k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel = kth_largest(x, base, segs, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sel.bracketed and sel.plan.nchunk == [512]
    old = kth_largest(x, base, segs, k, passes=PASSES)
    for name in ("values", "k", "eq"):
        assert torch.equal(getattr(sel, name), getattr(old, name)), name
    assert int(sel.fallbacks.sum()) == 0
    check(sel, x, base, segs, k, cpu=False)


def _tied_family(dtype, seed):
    """Segments whose |δ| take few values (exact in every dtype: multiples of 1/8 on multiples of 1/4), so the
    k-th largest is tied over many tiles: 16 values (the sample brackets a range: candidates stored), 4 values
    with > 50 % zeros (the bracket collapses on one value: counted, not stored), and a random segment."""
    from fastmerge.kernels._common import Segments

    g = torch.Generator().manual_seed(seed)
    numels = [700, 640, 33 * 17, 1]
    base = torch.randint(-8, 8, (sum(numels),), generator=g).float() * 0.25
    x = base[None] + torch.randint(-8, 8, (3, sum(numels)), generator=g).float() * 0.125
    a = numels[0]
    x[:, a:a + numels[1]] = base[a:a + numels[1]] + torch.randint(-1, 2, (3, numels[1]), generator=g).float() * 0.125 * (
        torch.rand(3, numels[1], generator=g) < 0.08).float()
    a += numels[1]
    base[a:a + numels[2]] = torch.randn(numels[2], generator=g)
    x[:, a:a + numels[2]] = base[a:a + numels[2]] + 0.01 * torch.randn(3, numels[2], generator=g)
    return x.to(dtype).to(DEV), base.to(dtype).to(DEV), Segments.packed(numels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["sampled", "missed"])
def test_ties_topk_ranks_its_ties_from_the_candidates(monkeypatch, dtype, how):
    """Exact-k TIES on whole tensors counts each tile's entries at the cut among the bracket's candidates
    (``Launch.tile_ties``): no tie-count read of the data (``gta.tie_counts`` is never called), bit-exact vs the
    reference on a NaN-poisoned output, with heavy ties at the cut spread over many 64-element tiles, a one-value
    bracket, an inactive model, and (``missed``) queries the radix select answered, counted on the data."""
    from fastmerge.kernels import select_bracket as sb
    from fastmerge.kernels import ties as ties_mod
    from fastmerge.methods.ties import TiesParams

    monkeypatch.setattr(sb, "DEFAULT", _cfg(z=-3.0, headroom=0.0, slack=0) if how == "missed" else _cfg())

    def no_read(*a, **k):
        raise AssertionError("exact-k read the data again to count its ties")

    monkeypatch.setattr(ties_mod, "tie_counts", no_read)
    x, base, segs = _tied_family(dtype, seed=11)
    params = [TiesParams((0.5, -0.3, 1.1), (0.4, 0.005, 1.0 if s == 1 else 0.25), selection="topk") for s in range(segs.count)]
    kern = ties_mod.TiesKernel(params, segs.numel, x.device)
    out = poisoned(x.shape[1], dtype)
    kern.run(x, base, out, segs, block=64)
    r = kern.sel.result
    act = torch.tensor([[d < 1 for d in p.density] for p in params]).reshape(-1).to(r.lo.device)
    assert kern.sel.bracketed and kern.sel.launch is None  # the merge used the candidates, then let them go
    if how == "missed":
        assert int(kern.sel.fallbacks.sum()) > 0
    else:
        ok = act & (r.fail == 0)
        assert bool(((r.lo == r.hi) & ok).any()) and bool(((r.lo < r.hi) & ok).any()), (r.lo, r.hi, r.fail)
    assert int((kern.sel.eq.view(-1)[act] > 1).sum()) >= 4  # ties at the cut: the ranks decide
    assert_bits_equal(out, reference("ties", x, base, segs, params, dtype), f"ties topk {how}")


def test_tile_ties_equal_the_data_counts():
    """Per tile, the candidates' tie counts equal ``gta.tie_counts`` on the data (the read they replace)."""
    from fastmerge.kernels._common import make_tiles
    from fastmerge.kernels.gta import tie_counts
    from fastmerge.kernels.select import Selection

    x, base, segs = _tied_family(torch.bfloat16, seed=12)
    k = torch.tensor([[[max(1, int(0.4 * n))]] * 3 for n in segs.numel], dtype=torch.int64)
    sel = Selection.start(k, x.device, numel=segs.numel, config=_cfg(), tiles_out=True)
    sel.histogram(0, x, base, segs, block=64)
    tiles = make_tiles(segs, 64, x.device, aligned=True)
    got = sel.tile_ties(x, base, segs, tiles)
    want = tie_counts(x, base, segs, sel.values[..., 0], tiles)
    assert torch.equal(got.cpu(), want.cpu())
    assert int(want.sum()) > segs.count * 3  # ties at the cut in most segments and models
    assert sel.tile_ties(x, base, segs, make_tiles(segs, 64, x.device)) is None  # not the count pass's tiles


def test_ties_topk_rescale_l1_pass_reuses_the_candidates_tie_counts(monkeypatch):
    """Exact-k with the L1 rescale: the L1 pass runs over the merge's tiles and ranks its ties with the same
    per-tile counts from the bracket's candidates (no read of the data for them); ratios within 8 ulps of the
    reference's, and given its ratios the merge is bit-exact (``check_rescale``)."""
    from fastmerge.kernels import select_bracket as sb
    from fastmerge.kernels import ties as ties_mod
    from fastmerge.methods.ties import TiesParams, trim_mask

    from helpers.kernel_cases import check_rescale

    monkeypatch.setattr(sb, "DEFAULT", _cfg())

    def no_read(*a, **k):
        raise AssertionError("exact-k read the data again to count its ties")

    monkeypatch.setattr(ties_mod, "tie_counts", no_read)
    x, base, segs = _tied_family(torch.float32, seed=13)
    params = [TiesParams((0.5, -0.3, 1.1), (0.4, 0.005, 1.0 if s == 1 else 0.25), selection="topk", rescale=True)
              for s in range(segs.count)]
    keep = lambda s, t, d: trim_mask(d, params[s].density[t], "topk") if params[s].density[t] < 1 else None  # noqa: E731
    kern = ties_mod.TiesKernel(params, segs.numel, x.device)
    assert "l1" in kern.passes
    check_rescale(kern, x, base, segs, keep, "ties", params, torch.float32)
    assert kern.sel.bracketed and kern.sel.launch is None
