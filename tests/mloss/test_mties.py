"""M-TIES on tensors: rank-normalised keep ratios, the batched per-row trim, and equality with TIES."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.m_ties import MTiesParams
from fastmerge.mloss.mties import (
    keep_counts, m_ties_tensors, rank_scale, row_keep_ratios, row_kth_largest, trim_rows,
)


def family(rows=23, cols=37, T=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    xs = [(base + 0.1 * torch.randn(rows, cols, generator=g)).to(dtype) for _ in range(T)]
    return base.to(dtype), xs


def test_rank_scale_and_keep_ratios_by_hand():
    loss = torch.tensor([0.3, 0.1, 0.2, 0.1])
    # stable ranks: 0.1 (row 1) → 0, 0.1 (row 3) → 1, 0.2 → 2, 0.3 → 3; divided by n − 1 = 3
    assert rank_scale(loss).tolist() == [1.0, 0.0, 2 / 3, 1 / 3]
    keep = row_keep_ratios(loss, 0.8, 0.3)
    assert keep.tolist() == pytest.approx([0.5, 0.8, 0.6, 0.7])
    assert keep.max() == pytest.approx(0.8) and keep.min() == pytest.approx(0.5)  # [k − e, k]
    assert keep_counts(keep, 10).tolist() == [5, 8, 6, 7]
    assert keep_counts(torch.tensor([0.01, 1.0]), 10).tolist() == [1, 10]  # at least 1, at most all
    assert rank_scale(torch.tensor([7.0])).tolist() == [0.0]


def test_row_trim_by_hand():
    d = torch.tensor([[5.0, -1.0, 3.0, 0.5, -4.0], [1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, -1.0, 2.0, 2.0, 0.1]])
    counts = torch.tensor([2, 4, 3])
    assert trim_rows(d, counts).tolist() == [
        [True, False, False, False, True], [False, True, True, True, True],
        [True, True, True, True, False],  # threshold: the 3rd largest |δ| is 1, and both 1s are kept
    ]
    assert trim_rows(d, counts, "topk")[2].tolist() == [True, False, True, True, False]  # exactly 3
    # the same through M-TIES with one model and base 0: row losses (0.3, 0.1, 0.2), k = 0.8, e = 0.4
    # → keep (0.4, 0.8, 0.6) of 5 columns = (2, 4, 3)
    out = m_ties_tensors([d], torch.zeros(3, 5), row_loss=torch.tensor([0.3, 0.1, 0.2]), density=0.8, epsilon=0.4)
    assert torch.equal(out, torch.where(trim_rows(d, counts), d, 0.0))


@pytest.mark.parametrize("method", ["topk", "radix"])
def test_row_kth_largest_equals_sort(method):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(57, 70, generator=g).abs()
    x[3, :20] = 0.0  # zeros and repeated values
    x[5] = x[5, 0]
    x[7] = x[7].bfloat16().float()  # many equal magnitudes
    for k in (torch.randint(1, 71, (57,), generator=g), torch.full((57,), 70), torch.ones(57, dtype=torch.int64),
              torch.randint(50, 57, (57,), generator=g)):
        want = torch.sort(x, dim=1, descending=True).values.gather(1, (k - 1)[:, None]).squeeze(1)
        assert torch.equal(row_kth_largest(x, k, method=method), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_row_kernel_equals_sort(dtype):
    from fastmerge.kernels.topk_rows import row_kth_largest as kernel

    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 45, generator=g).to(dtype)  # interpreter: 9 rows × 31 passes, ~1 s
    x[2, :10] = 0
    k = torch.randint(1, 46, (9,), generator=g)
    want = torch.sort(x.float().abs(), dim=1, descending=True).values.gather(1, (k - 1)[:, None]).squeeze(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, else interpreted
    assert torch.equal(kernel(x.to(dev), k.to(dev)).cpu(), want)


def test_lowest_loss_row_keeps_k_highest_keeps_k_minus_e():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(10, 100, generator=g)  # distinct magnitudes: threshold keeps exactly n_j
    loss = torch.rand(10, generator=g)
    kept = trim_rows(d, keep_counts(row_keep_ratios(loss, 0.8, 0.2), 100)).sum(1)
    assert kept[loss.argmin()] == 80 and kept[loss.argmax()] == 60
    order = torch.argsort(loss)
    assert (kept[order][1:] <= kept[order][:-1]).all()  # more conflict, fewer kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epsilon_zero_is_ties_row_by_row(dtype):
    base, xs = family(dtype=dtype)
    loss = torch.rand(base.shape[0])
    w = [0.7, 1.0, 1.3]
    got = m_ties_tensors(xs, base, row_loss=loss, weight=w, density=0.6, epsilon=0.0)
    want = torch.stack([
        merge_tensors("ties", [x[r] for x in xs], base[r], weight=w, density=0.6, out_dtype=torch.float32, backend="torch")
        for r in range(base.shape[0])
    ])
    assert torch.equal(got, want)


def test_without_row_loss_is_ties_and_registry(backend):
    base, xs = family(rows=19, cols=31, seed=4, dtype=torch.bfloat16)
    want = merge_tensors("ties", xs, base, weight=1.0, density=0.8, backend=backend)
    assert torch.equal(merge_tensors("m_ties", xs, base, density=0.8, epsilon=0.1), want)
    ref = get_method("m_ties").reference
    p = MTiesParams(weight=(1.0, 1.0, 1.0), density=(0.8, 0.8, 0.8))
    assert torch.equal(ref(xs, base, p).to(torch.bfloat16), want)


def test_registry_reference_with_row_loss():
    base, xs = family(seed=5)
    loss = torch.rand(base.shape[0])
    p = MTiesParams(weight=(1.0, 2.0, 1.0), density=(0.9, 0.7, 0.8), epsilon=0.2, row_loss=tuple(loss.tolist()))
    got = get_method("m_ties").reference(xs, base, p)
    want = m_ties_tensors(xs, base, row_loss=loss.double(), weight=[1.0, 2.0, 1.0], density=[0.9, 0.7, 0.8], epsilon=0.2)
    assert torch.equal(got, want)
    # M-TIES keeps fewer entries than TIES at the same k (rows of higher loss keep less): the merge differs
    assert not torch.equal(got, m_ties_tensors(xs, base, weight=[1.0, 2.0, 1.0], density=[0.9, 0.7, 0.8]))


def test_identical_finetunes_give_the_finetune_at_density_one():
    base, xs = family(T=1, seed=6)
    x = xs[0]
    out = m_ties_tensors([x, x], base, row_loss=torch.rand(base.shape[0]), density=1.0, epsilon=0.0)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_validation():
    base, xs = family(rows=4, cols=5)
    with pytest.raises(ConfigError, match="epsilon"):
        merge_tensors("m_ties", xs, base, density=0.5, epsilon=0.6)
    with pytest.raises(ConfigError, match="density"):
        merge_tensors("m_ties", xs, base, density=0.0)
    with pytest.raises(ConfigError, match="row losses"):
        m_ties_tensors(xs, base, row_loss=torch.rand(3))
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("m_ties", xs)
    with pytest.raises(ConfigError, match="selection"):
        trim_rows(base, torch.ones(4, dtype=torch.int64), "exact")


@pytest.mark.gpu
def test_gpu_row_kernel_at_vit_shape():
    from fastmerge.kernels.topk_rows import row_kth_largest as kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (0.002 * torch.randn(3072, 768, device="cuda", generator=g)).bfloat16()
    k = torch.randint(537, 615, (3072,), device="cuda", generator=g)  # keep ratios in [0.7, 0.8] of 768
    want = torch.sort(x.float().abs(), dim=1, descending=True).values.gather(1, (k - 1)[:, None]).squeeze(1)
    assert torch.equal(kernel(x, k), want)
