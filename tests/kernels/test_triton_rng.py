"""kernels/_rng.py: the Triton port of the counter-based generator equals methods/rng.py bit for bit."""

import pytest
import torch

from fastmerge.methods import rng
from helpers.kernel_cases import DEV, needs_triton

pytestmark = needs_triton


triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastmerge.kernels import _rng  # noqa: E402


@triton.jit
def _hash_kernel(o_ptr, n, start, k0, k1h, k1, BIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    h = _rng.hash_u32(start + offs.to(tl.int64), k0.to(tl.uint32), k1h.to(tl.uint32), k1.to(tl.uint32), BIG)
    tl.store(o_ptr + offs, h.to(tl.int64), mask=offs < n)


def _hashes(seed: int, key: int, model: int, start: int, n: int) -> torch.Tensor:
    out = torch.full((n,), -1, dtype=torch.int64, device=DEV)
    k0, k1h, k1 = _rng.stream_table(seed, key, model)
    _hash_kernel[(1,)](out, n, start, k0, k1h, k1, BIG=start + n > 1 << 32, BLOCK=triton.next_power_of_2(n))
    return out.cpu()


@pytest.mark.parametrize(
    "seed,key,model,start",
    [(0, 1, 0, 0), (42, 2**62 + 12345, 7, 1000), (2**64 - 1, 99, 2**32 - 1, 2**32 - 150), (5, 6, 1, 5 * 2**32 + 3)],
)
def test_hash_equals_torch_generator(seed, key, model, start):
    # the last two cross / lie past the 2^32 element boundary: the hi word enters the hash (BIG path)
    assert torch.equal(_hashes(seed, key, model, start, 300), rng.hash_u32(seed, key, model, 300, start))


def test_scalar_threshold_is_the_uniform_test():
    scalar_threshold = _rng.scalar_threshold
    h = rng.hash_u32(3, 4, 0, 4096)
    u = (h >> 8).to(torch.float32) * 2.0**-24
    for p in (0.33, 0.5, 1e-9, 0.9999999):
        thr = scalar_threshold(p)
        assert torch.equal(h < thr, u < rng.fp32(p))
    assert scalar_threshold(0.99999999) is None  # fp32(p) = 1: every element kept
    assert scalar_threshold(0.0) == 0
