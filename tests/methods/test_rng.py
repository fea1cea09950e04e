"""rng: the counter-based generator behind DARE / DELLA masks, the contract every backend reproduces.

The table below is the cross-backend check: a C++ or Triton port must print the same numbers. It is
pinned twice: against an independent pure-Python transcription of the algorithm written here (not the
module's code), and against the module's vectorised torch path.
"""

import math
import time

import pytest
import torch

from fastmerge.methods import rng


# ------------------------------------------------------------------------------------------------
# independent transcription of the documented algorithm (plain integers, % 2**32 instead of masks)


def _lowbias32(v: int) -> int:
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) % 2**32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) % 2**32
    return v ^ (v >> 16)


def _hand_h(seed: int, key: int, model: int, i: int) -> int:
    seed %= 2**64
    s = 0x243F6A88
    for word in (seed % 2**32, seed // 2**32, key % 2**32, key // 2**32, model):
        s = _lowbias32(s ^ word)
    k0, k1 = s, _lowbias32(s ^ 0x9E3779B9)
    return _lowbias32(_lowbias32((i % 2**32) ^ k0) ^ _lowbias32(k1 ^ (i // 2**32)))


# (seed=0, key=1, model=0): h of elements 0..7, then of 2^32 .. 2^32+2 (the high counter word in play)
TABLE_H = [0x13BE8FB9, 0x96D61C86, 0xA02689E8, 0x0C80FBD6, 0x19FBB338, 0x565FF109, 0x67239EC7, 0x316D6529]
TABLE_H_HI = [0x8F20C8DF, 0x68EBC068, 0x5235A68A]
# (seed=42, key=2^62+12345, model=3): every key word non-zero
TABLE_H_KEYED = [0x82037F50, 0x4F0ADBF5, 0xD3EAEF78]


def test_table_matches_hand_written_integer_code():
    assert [_hand_h(0, 1, 0, i) for i in range(8)] == TABLE_H
    assert [_hand_h(0, 1, 0, 2**32 + i) for i in range(3)] == TABLE_H_HI
    assert [_hand_h(42, 2**62 + 12345, 3, i) for i in range(3)] == TABLE_H_KEYED


def test_module_reproduces_the_table():
    assert rng.hash_u32(0, 1, 0, 8).tolist() == TABLE_H
    assert rng.hash_u32(0, 1, 0, 3, start=2**32).tolist() == TABLE_H_HI
    assert rng.hash_u32(42, 2**62 + 12345, 3, 3).tolist() == TABLE_H_KEYED
    # u = (h >> 8)·2^-24, exact in fp32; keep iff u < fp32(p)
    u = rng.uniform(0, 1, 0, 8)
    assert u.dtype == torch.float32
    assert u.tolist() == [(h >> 8) / 2**24 for h in TABLE_H]
    # u = 0.077, 0.589, 0.626, 0.049, 0.101, 0.337, 0.403, 0.193
    assert rng.keep_mask(0, 1, 0, 0.3, 8).tolist() == [True, False, False, True, True, False, False, True]


def test_scalar_mix_and_keys_match_hand_code():
    for x in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert rng.mix32(x) == _lowbias32(x)
    # seed is taken modulo 2^64: -1 is 2^64 - 1
    assert rng.stream_keys(-1, 7, 2) == rng.stream_keys(2**64 - 1, 7, 2)


def test_module_matches_hand_code_across_the_2_pow_32_boundary():
    start = 2**32 - 5
    got = rng.hash_u32(123, 456789, 2, 10, start=start).tolist()
    assert got == [_hand_h(123, 456789, 2, start + j) for j in range(10)]


def test_deterministic():
    a = rng.keep_mask(7, 99, 1, 0.4, (33, 65))
    b = rng.keep_mask(7, 99, 1, 0.4, (33, 65))
    assert torch.equal(a, b)


@pytest.mark.parametrize("numel,split", [(3 * rng.CHUNK + 17, 12345), (1000, 1), (rng.CHUNK, rng.CHUNK - 1)])
def test_independent_of_chunking(numel, split):
    """Element i depends on i only: the two halves generated apart equal the whole."""
    whole = rng.hash_u32(5, 6, 7, numel)
    halves = torch.cat([rng.hash_u32(5, 6, 7, split), rng.hash_u32(5, 6, 7, numel - split, start=split)])
    assert torch.equal(whole, halves)
    p = torch.rand(numel)
    whole_m = rng.keep_mask(5, 6, 7, p, numel)
    halves_m = torch.cat([rng.keep_mask(5, 6, 7, p[:split], split),
                          rng.keep_mask(5, 6, 7, p[split:], numel - split, start=split)])
    assert torch.equal(whole_m, halves_m)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.33, 0.5, 0.9, 0.99])
def test_keep_rate_within_5_sigma(p):
    # keeps ~ Binomial(n, p): sd of the rate = sqrt(p(1-p)/n)
    n = 1 << 20
    rate = rng.keep_mask(2024, 31337, 0, p, n).float().mean().item()
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_uniform_is_uniform():
    # 64 equal bins of 2^18 draws: chi-square with 63 df (mean 63, sd 11.2); 63 + 5·11.2 = 119
    u = rng.uniform(1, 2, 3, 1 << 18)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    e = u.numel() / 64
    assert float(((counts - e) ** 2 / e).sum()) < 119
    # neighbours uncorrelated: lag-1 correlation sd = 1/sqrt(n)
    x = u.double() - 0.5
    corr = float((x[1:] * x[:-1]).mean() / x.var())
    assert abs(corr) < 5 / math.sqrt(u.numel())


@pytest.mark.parametrize("which", ["seed", "key", "model", "seed_hi", "key_hi"])
def test_different_streams_give_different_masks(which):
    base = dict(seed=3, key=1000, model=0)
    other = dict(base)
    other.update({"seed": {"seed": 4, "seed_hi": 3 + 2**32}.get(which, 3),
                  "key": {"key": 1001, "key_hi": 1000 + 2**32}.get(which, 1000),
                  "model": 1 if which == "model" else 0})
    n = 1 << 16
    a = rng.keep_mask(base["seed"], base["key"], base["model"], 0.5, n)
    b = rng.keep_mask(other["seed"], other["key"], other["model"], 0.5, n)
    # independent p = 0.5 masks agree on a fraction 0.5 ± 5·sqrt(0.25/n)
    agree = (a == b).float().mean().item()
    assert abs(agree - 0.5) <= 5 * math.sqrt(0.25 / n), agree


def test_tensor_p_matches_scalar_p_and_u_below_p():
    n = 50_000
    u = rng.uniform(8, 9, 1, n)
    for p in (0.0, 0.25, 1 / 3, 1.0):
        s = rng.keep_mask(8, 9, 1, p, n)
        t = rng.keep_mask(8, 9, 1, torch.full((n,), p), n)
        assert torch.equal(s, t)
        assert torch.equal(s, u < torch.tensor(p, dtype=torch.float32))
    assert not rng.keep_mask(8, 9, 1, 0.0, n).any() and rng.keep_mask(8, 9, 1, 1.0, n).all()
    # per-element probabilities
    p = torch.rand(n)
    assert torch.equal(rng.keep_mask(8, 9, 1, p, (100, 500)), (u < p).reshape(100, 500))


def test_p_is_rounded_to_fp32():
    # fp32(0.1) = 0.100000001490116...: an element with u exactly fp32(0.1) would flip if p were not
    # rounded; check the decision rule directly on the threshold form h < ceil(fp32(p)·2^24)·256
    p32 = rng.fp32(0.1)
    assert p32 != 0.1 and p32 == float(torch.tensor(0.1, dtype=torch.float32))
    h = rng.hash_u32(0, 1, 0, 1 << 16)
    assert torch.equal(rng.keep_mask(0, 1, 0, 0.1, 1 << 16), h < math.ceil(p32 * 2**24) * 256)


def test_mask_of_4096x1024_fast_on_one_core():
    # measured ~30 ms on one core (in-place int64 chunks); the brief asks for well under 100 ms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            rng.keep_mask(0, 123, 0, 0.3, (4096, 1024))
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.1, f"{best * 1e3:.0f} ms"
