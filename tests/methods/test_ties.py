"""ties: hand-worked cases of trim / election / disjoint mean, then every backend against the reference."""

import pytest
import torch

from fastmerge import merge_tensors
from fastmerge.errors import ConfigError
from fastmerge.methods import get_method
from fastmerge.methods.ties import TiesParams, trim_mask
from helpers.tolerance import assert_bitwise_equal

ref = get_method("ties").reference
X = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, -1.0, 2.0, 4.0]), torch.tensor([2.0, 3.0, -5.0, 1.0])]
ZERO = torch.zeros(4)


def test_sum_election_and_disjoint_mean_by_hand():
    # sums [2, 0, 0, 5.5]: a zero sum elects +; agreeing entries averaged by their weights
    out = ref(X, ZERO, TiesParams((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)))
    assert torch.equal(out, torch.tensor([1.5, 3.0, 2.5, 5.5 / 3]))


def test_count_election_by_hand():
    # sign counts [+1, -1, +1, +3]
    out = ref(X, ZERO, TiesParams((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), election="count"))
    assert torch.equal(out, torch.tensor([1.5, -1.5, 2.5, 5.5 / 3]))


def test_weights_enter_election_and_divisor():
    out = ref(X, ZERO, TiesParams((1.0, 1.0, 3.0), (1.0, 1.0, 1.0)))
    # elt0: wδ = [1, -1, 6] -> + : (1 + 6) / (1 + 3); elt2: [3, 2, -15] -> - : -15 / 3
    assert out[0].item() == 7 / 4 and out[2].item() == -5.0
    unnorm = ref(X, ZERO, TiesParams((1.0, 1.0, 3.0), (1.0, 1.0, 1.0), normalize=False, lambda_=0.5))
    assert unnorm[0].item() == 0.5 * 7 and unnorm[2].item() == 0.5 * -15


def test_trim_keeps_top_density_per_tensor():
    d = torch.tensor([[1.0, -5.0], [2.0, 0.1]])
    assert trim_mask(d, 0.5, "threshold").tolist() == [[False, True], [True, False]]
    # k = max(1, int(0.1 * 4)) = 1
    assert trim_mask(d, 0.1, "threshold").sum() == 1


def test_threshold_keeps_boundary_ties_topk_does_not():
    d = torch.tensor([1.0, 0.5, 1.0, 1.0, -0.25])
    assert trim_mask(d, 0.4, "threshold").tolist() == [True, False, True, True, False]
    assert trim_mask(d, 0.4, "topk").tolist() == [True, False, True, False, False]


def test_identical_finetunes_with_density_one_give_the_finetune():
    b = torch.randn(64)
    x = b + torch.randn(64)
    out = ref([x, x], b, TiesParams((0.5, 0.5), (1.0, 1.0)))
    assert torch.allclose(out, x, atol=1e-6)


def test_density_validated():
    with pytest.raises(ConfigError, match="density"):
        merge_tensors("ties", [torch.randn(4)], torch.randn(4), weight=1.0, density=0.0)
    with pytest.raises(ConfigError, match="density"):
        merge_tensors("ties", [torch.randn(4)], torch.randn(4), weight=1.0, density=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 2**16 + 3])
@pytest.mark.parametrize("election,selection", [("sum", "threshold"), ("count", "topk")])
def test_backend_matches_reference(backend, dtype, n, election, selection):
    b = torch.randn(n).to(dtype)
    xs = [(b.float() + 0.05 * torch.randn(n)).to(dtype) for _ in range(3)]
    kw = dict(weight=[0.3, 0.5, 0.4], density=[0.5, 0.3, 0.9], election=election, selection=selection)
    got = merge_tensors("ties", xs, b, backend=backend, **kw)
    p = TiesParams((0.3, 0.5, 0.4), (0.5, 0.3, 0.9), election=election, selection=selection)
    assert_bitwise_equal(got, ref(xs, b, p).to(dtype), f"ties {backend} {dtype} n={n}")
