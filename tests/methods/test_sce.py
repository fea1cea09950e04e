"""sce: hand-worked select / calculate / erase cases, validation, then every backend against the reference."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.sce import SceParams, topk_count, variance_mask
from helpers.backend_runs import skip_unless_runs
from helpers.tolerance import assert_bitwise_equal

METHOD = get_method("sce")
ref = METHOD.reference
ZERO = torch.zeros(4)
# deltas from a zero base; mean squares: 14.25/4, 22/4, 39/4
X = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, -1.0, 2.0, 4.0]), torch.tensor([2.0, 3.0, -5.0, 1.0])]
E1, E2, E3 = 14.25 / 4, 22 / 4, 39 / 4


def test_erase_and_energy_weights_by_hand():
    # column sums [2, 0, 0, 5.5]: every column elects + (a zero sum elects +); the normalisation of the
    # weights cancels in the disjoint mean, so the raw mean squares are used below
    out = ref(X, ZERO, SceParams())
    want = torch.tensor([
        (E1 * 1 + E3 * 2) / (E1 + E3),  # model 2 (−1) disagrees
        3.0,  # only model 3 (+3) agrees
        (E1 * 3 + E2 * 2) / (E1 + E2),  # model 3 (−5) disagrees
        (E1 * 0.5 + E2 * 4 + E3 * 1) / (E1 + E2 + E3),
    ])
    torch.testing.assert_close(out, want, rtol=2e-7, atol=0)


def test_election_is_on_unweighted_deltas():
    # δ = [+2, +2, −3] sums to +1, so + wins and models 1-2 (equal weights) give 2; an election on the
    # weighted deltas (mean squares 4, 4, 9) would sum 4·2 + 4·2 − 9·3 = −11 and elect −3 instead
    xs = [torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([-3.0])]
    assert ref(xs, torch.zeros(1), SceParams()).item() == 2.0


def test_single_model_and_identical_models_give_the_finetune():
    b = torch.randn(257)
    x = b + 0.1 * torch.randn(257)
    torch.testing.assert_close(ref([x], b, SceParams()), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref([x, x, x], b, SceParams()), x, rtol=0, atol=1e-6)


def test_zero_deltas_give_the_base_exactly():
    b = torch.randn(33)
    assert torch.equal(ref([b.clone(), b.clone()], b, SceParams()), b)
    assert torch.equal(ref([b.clone(), b.clone()], b, SceParams(select_topk=0.5)), b)


def test_tiny_task_vectors_get_uniform_weights():
    # mean squares 1e-8 and 9e-8 sum below 1e-6: weights become 1/2, 1/2 (energy weights would give
    # 0.1 / 0.9 and 2.8e-4)
    xs = [torch.full((2,), 1e-4), torch.full((2,), 3e-4)]
    torch.testing.assert_close(ref(xs, torch.zeros(2), SceParams()), torch.full((2,), 2e-4), rtol=1e-6, atol=0)


def test_variance_selection_by_hand():
    # T=2: var = ((δ1 − δ2)/2)² = [1, 0, 0, 4, 0]; nnz 2, k = int(2·0.5) = 1: only position 3 is kept
    d1 = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0])
    d2 = torch.tensor([-1.0, 0.0, 2.0, 1.0, 3.0])
    b = torch.full((5,), 0.5)
    out = ref([b + d1, b + d2], b, SceParams(select_topk=0.5))
    # masked mean squares: 25/5 and 1/5; both + at position 3
    want = b.clone()
    want[3] += (5.0 * 5 + 0.2 * 1) / (5.0 + 0.2)
    torch.testing.assert_close(out, want, rtol=2e-7, atol=0)


def test_threshold_keeps_variance_ties_exact_keeps_k():
    # var = [1, 4, 4, 0]: nnz 3, k = int(3·0.34) = 1; the threshold (4) keeps both 4s, topk one of them
    deltas = torch.stack([torch.tensor([1.0, 2.0, -2.0, 7.0]), torch.tensor([-1.0, -2.0, 2.0, 7.0])])
    assert variance_mask(deltas, 0.34, exact=False).tolist() == [False, True, True, False]
    exact = variance_mask(deltas, 0.34, exact=True)
    assert int(exact.sum()) == 1 and bool(exact[1] | exact[2])
    # k = 0 (int(3·0.2) = 0): nothing kept
    assert not variance_mask(deltas, 0.2, exact=False).any()


def test_equal_deltas_have_zero_variance():
    # fp32 deltas equal in all 3 models: variance exactly 0, so they are not counted in nnz(v) (a plain
    # two-pass mean 3d/3 misses d for ~15% of random fp32 values); 2 differing positions → nnz 2, k = 1
    d = torch.randn(1000)
    deltas = torch.stack([d, d, d])
    deltas[0, 10] += 1.0
    deltas[1, 20] += 2.0
    keep = variance_mask(deltas, 0.5, exact=False)
    assert keep.nonzero().flatten().tolist() == [20]  # var at 20 (δ differs by 2) > var at 10 (by 1)


def test_topk_count_uses_the_fp32_product():
    # mergekit multiplies an int64 count by the fraction in fp32: 90·0.7 → 63 (float64: 62.99… → 62),
    # 180·0.65 → 116 (float64: 117.0)
    assert topk_count(90, 0.7) == 63
    assert topk_count(180, 0.65) == 116
    assert topk_count(10, 0.5) == 5


def test_select_topk_validated_and_base_required():
    xs, b = [torch.randn(4)], torch.randn(4)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="select_topk"):
            merge_tensors("sce", xs, b, select_topk=bad)
    with pytest.raises(ConfigError, match="needs base"):
        merge_tensors("sce", xs)
    # int8_mask is accepted (memory only in mergekit) and changes nothing
    assert torch.equal(merge_tensors("sce", xs, b, int8_mask=True), merge_tensors("sce", xs, b))


def _runs(backend: str, compat: bool = False) -> None:
    skip_unless_runs(backend, METHOD, SceParams(), compat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 129), (3, 5, 11)])
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
@pytest.mark.parametrize("compat", [False, True])
def test_backend_matches_reference(backend, dtype, shape, select_topk, compat):
    _runs(backend, compat)
    b = torch.randn(shape).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(shape)).to(dtype) for _ in range(3)]
    got = merge_tensors("sce", xs, b, backend=backend, select_topk=select_topk, mergekit_compat=compat)
    want = ref(xs, b, SceParams(select_topk), compat=compat).to(dtype)
    assert_bitwise_equal(got, want, f"sce {backend} {dtype} {shape} topk={select_topk} compat={compat}")
    if not compat:  # fp32 math, one rounding: the output equals the fp32 reference rounded
        assert ref(xs, b, SceParams(select_topk)).dtype == torch.float32
