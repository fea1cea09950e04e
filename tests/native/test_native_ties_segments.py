"""fastmerge._C.ties_segments and the small-tensor selection under it (kth_largest_abs_diff_multi for n <= 2^16:
n² compares up to 64 values; else a radix round on the top 11 bits of |δ| (fewer for a few elements; its bin
guessed from a quarter of them, checked), the extremes of the chosen bin, a counting select between them; the
exact-k cut found in the |δ| the selection holds). Each segment must be bit-identical to one ``ties`` call on
it and to the torch reference, on every segment size 1..2100 and some up to 70000, on data that reaches every
branch: random, MoE-like bf16 deltas (few values, hundreds equal to the threshold), few distinct values, all
|δ| equal, all zero, NaN/±inf, adjacent fp32 bit patterns, one bin, mixed dtypes, density 1 and densities
whose k is 1, exact-k on and off, rescale. Outputs are poisoned (NaN) first. See native_cases.py for the
conventions."""

from __future__ import annotations

import pytest
import torch

from fastmerge import _native
from fastmerge.methods import get_method
from fastmerge.methods.ties import TiesParams, keep_count
from native_cases import BF16, F16, F32, assert_equal_bits, exact_norms, poisoned

pytestmark = pytest.mark.skipif(
    not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}"
)

KINDS = ("random", "moe", "few", "equal", "zero", "special", "ulps", "onebin")


def segment_data(n: int, T: int, kind: str, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """fp32 fine-tunes and base of one segment (rounded to their dtypes by the caller)."""
    b = torch.randn(n, generator=gen)
    if kind == "random":
        xs = [b + 0.5 * torch.randn(n, generator=gen) for _ in range(T)]
    elif kind == "moe":  # bf16 base + 0.01·N(0, 1): |δ| of a few ulps of the base, heavily tied
        b = b.to(BF16).float()
        xs = [b + 0.01 * torch.randn(n, generator=gen) for _ in range(T)]
    elif kind == "few":  # |δ| in {0, 0.25, 0.5, 0.75, 1}
        b = (torch.randint(-16, 16, (n,), generator=gen) * 0.5 + 0.25)
        xs = [b + torch.randint(-4, 5, (n,), generator=gen) * 0.25 for _ in range(T)]
    elif kind == "equal":  # every |δ| equal, signs random
        b = (torch.randint(-16, 16, (n,), generator=gen) * 0.5)
        xs = [b + (torch.randint(0, 2, (n,), generator=gen) * 2 - 1) * 0.375 for _ in range(T)]
    elif kind == "zero":
        xs = [b.clone() for _ in range(T)]
    elif kind == "ulps":  # fp32 |δ| on 5 adjacent bit patterns (one bin), a tenth elsewhere (0 or 1)
        b = torch.zeros(n)
        xs = []
        for _ in range(T):
            mag = (torch.randint(0, 5, (n,), generator=gen, dtype=torch.int32) + 0x3E800000).view(torch.float32)
            other = torch.rand(n, generator=gen) < 0.1
            mag = torch.where(other, (torch.rand(n, generator=gen) < 0.5).float(), mag)
            xs.append(mag * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1))
    elif kind == "onebin":  # every |δ| in [0.25, 0.279]: one first-round bin (exponent and 3 mantissa bits)
        b = torch.zeros(n)
        xs = [(0.25 + 0.029 * torch.rand(n, generator=gen)) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
              for _ in range(T)]
    else:  # "special": NaN, +inf, -inf in inputs and base at a few positions
        xs = [b + 0.5 * torch.randn(n, generator=gen) for _ in range(T)]
        for i, x in enumerate(xs):
            pos = torch.randint(0, n, (max(1, n // 50),), generator=gen)
            x[pos] = torch.tensor([float("nan"), float("inf"), float("-inf")])[(torch.arange(pos.numel()) + i) % 3]
        if n > 3:
            b[n // 3] = float("inf")
    return xs, b


def packed_case(sizes, T: int, in_dtypes, base_dtype, seed: int, kinds=KINDS):
    """Packed buffers of segments of the given sizes, segment s of kind kinds[s % len(kinds)]."""
    gen = torch.Generator().manual_seed(seed)
    parts = [segment_data(n, T, kinds[s % len(kinds)], gen) for s, n in enumerate(sizes)]
    inputs = [torch.cat([p[0][i] for p in parts]).to(in_dtypes[i]) for i in range(T)]
    base = torch.cat([p[1] for p in parts]).to(base_dtype)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return inputs, base, offsets


def run_segments(inputs, base, offsets, p: TiesParams, out_dtype, threads: int = 1) -> torch.Tensor:
    out = poisoned(offsets[-1], out_dtype)
    _native.ties_segments(out, inputs, base, offsets, p.weight, p.density, p.normalize, p.lambda_, p.election,
                          p.selection == "topk", threads, p.rescale)
    return out


def run_one(inputs, base, p: TiesParams, out_dtype) -> torch.Tensor:
    out = poisoned(base.numel(), out_dtype)
    _native.ties(out, inputs, base, p.weight, p.density, p.normalize, p.lambda_, p.election, p.selection == "topk",
                 1, p.rescale)
    return out


def check_segments(inputs, base, offsets, p: TiesParams, out_dtype, reference_every: int = 1) -> None:
    """Every segment against one ties call; every reference_every-th (and every one under 70) against the
    reference."""
    got = run_segments(inputs, base, offsets, p, out_dtype)
    ref = get_method("ties")
    with exact_norms():
        for s, (a, z) in enumerate(zip(offsets, offsets[1:])):
            if z == a:
                continue
            seg_in = [x[a:z] for x in inputs]
            what = f"segment {s} [{a}, {z}) {p.selection} rescale={p.rescale}"
            assert_equal_bits(got[a:z], run_one(seg_in, base[a:z], p, out_dtype), what + " vs one ties call")
            if s % reference_every == 0 or z - a < 70:
                assert_equal_bits(got[a:z], ref.reference(seg_in, base[a:z], p).to(out_dtype), what + " vs reference")


def params(selection: str, rescale: bool, density=(0.5, 0.2, 1.0), weight=(0.7, -0.4, 1.1)) -> TiesParams:
    return TiesParams(weight=weight[:len(density)], density=density, selection=selection, rescale=rescale)


def selection_branch(bits: torch.Tensor, k: int) -> str:
    """The branch of the small-tensor selection (csrc/cpu/select.cpp, small_query) that the k-th largest of
    these |δ| bit patterns takes, so that the tests can show their data reaches every one."""
    n = bits.numel()
    lo, hi = int(bits.min()), int(bits.max())
    if lo == hi:
        return "all equal"
    if n <= 64:
        return "tiny"
    shift = 20  # coarser where the range would hold more than max(64, n / 4) bins
    while (hi >> shift) - (lo >> shift) + 1 > max(64, n // 4):
        shift += 1
    if lo >> shift == hi >> shift:
        return "one bin"
    th = int(torch.sort(bits, descending=True).values[k - 1])
    key = bits >> shift
    in_bin = bits[key == th >> shift]
    rr = k - int((key > th >> shift).sum())
    mn, mx = int(in_bin.min()), int(in_bin.max())
    if mn == mx:
        return "bin of one value"
    if rr <= int((in_bin == mx).sum()):
        return "bin maximum"
    if rr > in_bin.numel() - int((in_bin == mn).sum()):
        return "bin minimum"
    return "inside the bin"


def test_data_reaches_every_selection_branch():
    inputs, base, offsets = packed_case(range(1, 2101), 3, [BF16] * 3, BF16, seed=1)
    seen: dict[str, int] = {}
    cuts = 0
    for a, z in zip(offsets, offsets[1:]):
        for x, d in zip(inputs, (0.5, 0.2)):
            bits = (x[a:z].float() - base[a:z].float()).abs().view(torch.int32) & 0x7FFFFFFF
            k = keep_count(d, z - a)
            b = selection_branch(bits, k)
            seen[b] = seen.get(b, 0) + 1
            th = int(torch.sort(bits, descending=True).values[k - 1])
            if th <= 0x7F800000:  # exact-k needs a cut when more ties than room
                cuts += int((bits == th).sum()) > k - int(((bits > th) & (bits <= 0x7F800000)).sum())
    assert set(seen) == {"all equal", "tiny", "one bin", "bin of one value", "bin maximum", "bin minimum",
                         "inside the bin"}, seen
    assert min(seen.values()) >= 20, seen
    assert cuts >= 100


@pytest.mark.parametrize("selection,rescale,reference_every", [
    ("threshold", False, 1), ("topk", False, 1), ("threshold", True, 5), ("topk", True, 5),
])
def test_every_size_to_2100(selection, rescale, reference_every):
    inputs, base, offsets = packed_case(range(1, 2101), 3, [BF16] * 3, BF16, seed=1)
    check_segments(inputs, base, offsets, params(selection, rescale), BF16, reference_every)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_every_size_mixed_dtypes(selection):
    # sizes 1..2100 in steps of 3, with an offset per kind so that every kind meets small and large sizes
    inputs, base, offsets = packed_case(range(2, 2101, 3), 3, [F32, F16, BF16], F16, seed=2)
    check_segments(inputs, base, offsets, params(selection, False), F32, reference_every=3)
    check_segments(inputs, base, offsets, params(selection, True), F16, reference_every=7)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_large_segments(selection):
    # up to and past the 2^16 elements of the small-tensor path (the sampled path beyond)
    sizes = [2049, 4096, 4097, 65535, 65536, 65537, 70000, 3]
    inputs, base, offsets = packed_case(sizes, 2, [BF16, F32], BF16, seed=3, kinds=("moe", "random", "few", "special", "ulps"))
    check_segments(inputs, base, offsets, params(selection, False, density=(0.5, 0.3)), BF16)
    check_segments(inputs, base, offsets, params(selection, True, density=(0.9, 0.05)), F32)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_extreme_densities(selection):
    # k = 1 (the largest |δ|, NaN where there is one), k = n − 1 or so, and density 1 (no selection)
    sizes = [1, 2, 63, 64, 65, 66, 100, 257, 1000, 2048, 2100]
    inputs, base, offsets = packed_case(sizes, 3, [BF16, F16, BF16], BF16, seed=4)
    for density in [(1e-6, 0.999, 1.0), (0.001, 0.9999, 0.5), (1.0, 1.0, 1.0)]:
        check_segments(inputs, base, offsets, params(selection, False, density=density), BF16)
        check_segments(inputs, base, offsets, params(selection, True, density=density), F32)


def test_threads_do_not_change_bits():
    inputs, base, offsets = packed_case([2048] * 64 + [1, 7, 2100] * 8, 3, [BF16] * 3, BF16, seed=5)
    for selection in ("threshold", "topk"):
        p = params(selection, True)
        one = run_segments(inputs, base, offsets, p, BF16, threads=1)
        two = run_segments(inputs, base, offsets, p, BF16, threads=2)
        assert_equal_bits(two, one, f"{selection}: 2 threads vs 1")


@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 100, 1000, 2047, 2048, 2049, 4097, 65536])
@pytest.mark.parametrize("kind", KINDS)
def test_small_selection_counts(n, kind):
    """The k-th largest |x − base| and its counts (above, equal, NaN) against torch, for k at both ends and
    in between: the counts decide the exact-k cut."""
    gen = torch.Generator().manual_seed(n)
    xs, b = segment_data(n, 2, kind, gen)
    xs = [xs[0].to(BF16), xs[1]]
    base = b.to(BF16)
    ks = sorted({1, min(2, n), max(1, n // 3), max(1, n // 2), max(1, n - n // 10), n})
    got, _ = _native._C.kth_largest_abs_diff_multi([xs[0].data_ptr(), xs[1].data_ptr()], [2, 0], base.data_ptr(), 2,
                                                   n, [i for i in (0, 1) for _ in ks], ks * 2, 1)
    for (value, above, equal, nans), (model, k) in zip(got, [(i, k) for i in (0, 1) for k in ks]):
        mag = (xs[model].float() - base.float()).abs()
        # bit patterns with the sign cleared order like the magnitudes, NaN above +inf (as in torch.sort)
        bits = mag.view(torch.int32) & 0x7FFFFFFF
        wb = int(torch.sort(bits, descending=True).values[k - 1])
        want = torch.tensor([wb], dtype=torch.int32).view(torch.float32)
        assert (value == want.item()) or (value != value and bool(want.isnan())), (kind, n, model, k, value, want)
        assert above == int((bits > wb).sum()), (kind, n, model, k)
        assert equal == int((bits == wb).sum()), (kind, n, model, k)
        assert nans == int(mag.isnan().sum()), (kind, n, model, k)


def test_fp8_operand_is_refused():
    x = torch.randn(64).to(BF16)
    q = torch.randn(64).to(torch.float8_e4m3fn)
    src = _native.Fp8Source(q.view(torch.uint8).data_ptr(), 64, "float8_e4m3fn", [64], keep=(q,))
    out = poisoned(64, BF16)
    with pytest.raises(ValueError, match="FP8"):
        _native.ties_segments(out, [x, src], x, [0, 32, 64], [0.5, 0.5], [0.5, 0.5], True)
    assert bool(out.isnan().all())  # nothing written
