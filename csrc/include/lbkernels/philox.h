// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2,
// 3", SC 2011): a counter-based generator, host and device inline, used by the CPU and
// CUDA kernels of the noise variants of extrap_sgd_ (docs/algorithms.md section 2.1).
//
// Counter layout. Element e (row-major index within its tensor) of tensor i (its
// position in the op's lists) in the call with (seed, offset) takes lane e % 4 of
//
//   philox4x32_10(counter = {lo32(e / 4), hi32(e / 4), uint32(i), lo32(offset)},
//                 key     = {lo32(seed),  hi32(seed) ^ hi32(offset)})
//
// so a call draws each value once, tensors and calls (offsets) draw disjoint streams, and
// the draw does not depend on how the work is split across threads or blocks.
// Lanes map to values:
//   U(-1, 1): u = (2 * (word >> 8) + 1 - 2^24) * 2^-24, the 2^24 odd multiples of 2^-24
//             in (-1, 1), exactly symmetric (mean 0, variance 1/3 - 2^-48/3);
//   N(0, 1):  Box-Muller on the word pairs (0, 1) and (2, 3): with
//             a = ((w0 >> 8) + 1) * 2^-24 in (0, 1] and b = (w1 >> 8) * 2^-24 in [0, 1),
//             lane 0 = sqrt(-2 ln a) cos(2 pi b), lane 1 = sqrt(-2 ln a) sin(2 pi b).
// Values are computed in fp32 (also for fp64 tensors).
// python_tests/test_extrap_ops.py checks a Python transcription of this generator against
// the known-answer vectors of the paper's reference implementation (Random123), and the
// compiled kernels' U(-1, 1) draws against that transcription bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LBK_PHILOX_HD __host__ __device__ __forceinline__
#else
#define LBK_PHILOX_HD inline
#endif

namespace lbkernels {

struct Philox4 {
  uint32_t v[4];
};

LBK_PHILOX_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds; the key is bumped by the Weyl constants between rounds.
LBK_PHILOX_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c.v[0], hi0, lo0);
    philox_mulhilo(kM1, c.v[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// The stream of one tensor in one call (see the layout above).
struct PhiloxStream {
  uint32_t k0, k1;  // key
  uint32_t tensor;  // counter word 2
  uint32_t offset;  // counter word 3

  LBK_PHILOX_HD PhiloxStream(uint64_t seed, uint64_t offset64, uint32_t tensor_index)
      : k0(static_cast<uint32_t>(seed)),
        k1(static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset64 >> 32)),
        tensor(tensor_index),
        offset(static_cast<uint32_t>(offset64)) {}

  // The four words of elements 4q .. 4q+3.
  LBK_PHILOX_HD Philox4 block(uint64_t q) const {
    return philox4x32_10(
        Philox4{{static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), tensor, offset}}, k0,
        k1);
  }
};

LBK_PHILOX_HD float philox_uniform_pm1(uint32_t word) {
  const int32_t odd = static_cast<int32_t>((word >> 8) << 1) + 1 - (1 << 24);
  return static_cast<float>(odd) * 5.9604644775390625e-08f;  // 2^-24
}

// Two N(0, 1) values from two words (Box-Muller).
LBK_PHILOX_HD void philox_normal2(uint32_t w0, uint32_t w1, float& z0, float& z1) {
  const float a = static_cast<float>((w0 >> 8) + 1u) * 5.9604644775390625e-08f;  // (0, 1]
  const float b = static_cast<float>(w1 >> 8) * 5.9604644775390625e-08f;         // [0, 1)
  const float radius = sqrtf(-2.0f * logf(a));
#if defined(__CUDA_ARCH__)
  // cos/sin of pi * 2b (2b is exact): sinf/cosf carry a large-argument reduction that
  // puts a 28-byte array in local memory, which the compile check forbids; the angle is
  // below 2 pi, so the value is the same to an ulp or two.
  sincospif(2.0f * b, &z1, &z0);
  z0 *= radius;
  z1 *= radius;
#else
  const float theta = 6.28318530717958647692f * b;
  z0 = radius * cosf(theta);
  z1 = radius * sinf(theta);
#endif
}

// The four values of a block: U(-1, 1) (gaussian == false) or N(0, 1).
LBK_PHILOX_HD void philox_values(const Philox4& w, bool gaussian, float out[4]) {
  if (gaussian) {
    philox_normal2(w.v[0], w.v[1], out[0], out[1]);
    philox_normal2(w.v[2], w.v[3], out[2], out[3]);
  } else {
    for (int k = 0; k < 4; ++k) out[k] = philox_uniform_pm1(w.v[k]);
  }
}

}  // namespace lbkernels
