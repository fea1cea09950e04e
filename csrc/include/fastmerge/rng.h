// fastmerge/rng.h: the counter-based generator of the random sparsifiers (DARE, DELLA), host and device.
//
// This is a port of fastmerge/methods/rng.py, the cross-backend contract: every keep decision is a pure
// function of (seed, key = stable hash of the tensor name, model = index among the non-base inputs,
// i = flat element index). Only uint32 arithmetic (multiplication modulo 2^32, xor, logical shift), so
// g++, nvcc and Triton (tl.uint32) give the same bits. tests/native/test_native_dare.py checks these
// functions against the torch reference (rng.hash_u32 / rng.keep_mask) bit for bit.
//
//     mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
//     stream:    s = 0x243F6A88; for w in (seed lo, seed hi, key lo, key hi, model): s = mix32(s ^ w)
//                k0 = s, k1 = mix32(s ^ 0x9E3779B9)
//     element i: h = mix32(mix32(lo(i) ^ k0) ^ mix32(k1 ^ hi(i)))
//     uniform:   u = (h >> 8) * 2^-24   (exact in fp32)        keep: u < fp32(p)
//
// For a scalar p the test is done on integers: u < p  <=>  (h >> 8) < ceil(p * 2^24) (p * 2^24 is exact for
// an fp32 p, and h >> 8 is an integer), see scalar_threshold.
#pragma once

#include <cstdint>

#include "fastmerge/common.h"

namespace fastmerge {
namespace rng {

constexpr uint32_t kMul1 = 0x7FEB352Du;
constexpr uint32_t kMul2 = 0x846CA68Bu;
constexpr uint32_t kStreamInit = 0x243F6A88u;
constexpr uint32_t kK1Tweak = 0x9E3779B9u;

// lowbias32 (a bijection of the 32-bit integers). Generic over U so that the CPU kernels can run it on
// vectors of uint32 lanes (GCC vector types: the same operations lane by lane); mix32 is the scalar.
template <class U>
FM_HOST_DEVICE U mix32_lanes(U x) {
  x ^= x >> 16;
  x *= kMul1;
  x ^= x >> 15;
  x *= kMul2;
  x ^= x >> 16;
  return x;
}

FM_HOST_DEVICE uint32_t mix32(uint32_t x) { return mix32_lanes(x); }

struct Stream {
  uint32_t k0;
  uint32_t k1;
};

// The keys of the (seed, key, model) stream. `seed` is Python's seed modulo 2^64, `key` < 2^63.
FM_HOST_DEVICE Stream stream_keys(uint64_t seed, uint64_t key, uint32_t model) {
  uint32_t s = kStreamInit;
  s = mix32(s ^ uint32_t(seed));
  s = mix32(s ^ uint32_t(seed >> 32));
  s = mix32(s ^ uint32_t(key));
  s = mix32(s ^ uint32_t(key >> 32));
  s = mix32(s ^ model);
  Stream st;
  st.k0 = s;
  st.k1 = mix32(s ^ kK1Tweak);
  return st;
}

// mix32(k1 ^ hi(i)): the same for every element of a run of 2^32 indices (every CPU block of 1024
// elements, which never straddles a multiple of 2^32), so the hot loops compute it once.
FM_HOST_DEVICE uint32_t hi_word(const Stream& s, uint64_t i) { return mix32(s.k1 ^ uint32_t(i >> 32)); }

// h of the element whose low index word is `lo`, given hi_word of its run.
template <class U>
FM_HOST_DEVICE U hash_lo_lanes(const Stream& s, U lo, uint32_t hiw) { return mix32_lanes(mix32_lanes(lo ^ s.k0) ^ hiw); }

FM_HOST_DEVICE uint32_t hash_lo(const Stream& s, uint32_t lo, uint32_t hiw) { return hash_lo_lanes(s, lo, hiw); }

FM_HOST_DEVICE uint32_t hash(const Stream& s, uint64_t i) { return hash_lo(s, uint32_t(i), hi_word(s, i)); }

// u = (h >> 8) * 2^-24: a 24-bit integer converts to fp32 exactly and the power-of-two scale is exact.
FM_HOST_DEVICE float uniform(uint32_t h) { return fm_mul(float(h >> 8), 5.9604644775390625e-8f); }

// keep iff (h >> 8) < T, T = ceil(fp32(p) * 2^24) clamped to [0, 2^24] (p >= 1 keeps all, p <= 0 none).
// Compared as int32 (both sides < 2^31) so that SSE/AVX vectorise it (no unsigned compare there).
FM_HOST_DEVICE int32_t scalar_threshold(double p) {
  const float p32 = float(p);  // round to nearest even, as torch.tensor(p, dtype=float32)
  const double t = double(p32) * 16777216.0;  // exact
  if (!(t > 0.0)) return 0;                   // also NaN
  if (t >= 16777216.0) return 16777216;
  const int32_t ti = int32_t(t);  // t < 2^24: truncation, then ceil by hand
  return double(ti) < t ? ti + 1 : ti;
}

FM_HOST_DEVICE bool keep_scalar(uint32_t h, int32_t threshold) { return int32_t(h >> 8) < threshold; }

}  // namespace rng
}  // namespace fastmerge
