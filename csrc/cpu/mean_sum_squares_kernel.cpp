// Vectorised CPU loop of mean_sum_squares_ (docs/algorithms.md section 1.1): g = sum / k
// in place, and the sum of squares of the stored g, in one visit of each element. This
// file is compiled once per CPU capability (DEFAULT, AVX2, AVX512) like lars_kernel.cpp;
// the host code (mean_sum_squares.cpp) declares the same function for each.
//
// The sums are taken as lars_kernel.cpp's norm pass sums a gradient (four vector
// accumulators in the working precision within a 64K chunk, the chunk's lanes and tail
// added in double), so the norm handed to lars_sgd_ is the one its own pass would find
// up to the order of the chunks' lanes.
#include <type_traits>

#include <lbkernels/math.h>

#include "kernel_dispatch.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

// x / k, or x * (1 / k) when that is the same number: for a power of two k the
// reciprocal is exact, so both are the exact x / k rounded once (subnormals included):
// the same bits. A vector multiplication issues every half cycle, an AVX-512 vdivps
// every ~10: the pass stays memory-bound on more cores. On this shared 2-core machine the two were not told apart (a 25 MiB bucket:
// 1.1-1.4 ms either way at one thread, like torch's div_).
template <typename V, bool kReciprocal>
inline V mean_of(V x, V k) {
  if constexpr (kReciprocal) {
    return x * k;  // k holds 1 / world_size here
  } else {
    return lbkernels::worker_mean(x, k);
  }
}

// fp32/fp64: full vectors (four in flight), then a scalar tail with the same expression.
template <typename T, bool kReciprocal>
double mean_squares_same(T* x, int64_t n, T k) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const V kv(k);
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t i = 0;
  for (; i + 4 * S <= n; i += 4 * S) {
    const V x0 = mean_of<V, kReciprocal>(V::loadu(x + i), kv);
    const V x1 = mean_of<V, kReciprocal>(V::loadu(x + i + S), kv);
    const V x2 = mean_of<V, kReciprocal>(V::loadu(x + i + 2 * S), kv);
    const V x3 = mean_of<V, kReciprocal>(V::loadu(x + i + 3 * S), kv);
    x0.store(x + i);
    x1.store(x + i + S);
    x2.store(x + i + 2 * S);
    x3.store(x + i + 3 * S);
    a0 = at::vec::fmadd(x0, x0, a0);
    a1 = at::vec::fmadd(x1, x1, a1);
    a2 = at::vec::fmadd(x2, x2, a2);
    a3 = at::vec::fmadd(x3, x3, a3);
  }
  for (; i + S <= n; i += S) {
    const V x0 = mean_of<V, kReciprocal>(V::loadu(x + i), kv);
    x0.store(x + i);
    a0 = at::vec::fmadd(x0, x0, a0);
  }
  const V acc = (a0 + a1) + (a2 + a3);
  T lanes[S];
  acc.store(lanes);
  double s = 0;
  for (int64_t l = 0; l < S; ++l) s += static_cast<double>(lanes[l]);
  for (; i < n; ++i) {
    x[i] = mean_of<T, kReciprocal>(x[i], k);
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
  return s;
}

// fp16/bf16: the quotient in fp32, rounded once to T; the square of the rounded value,
// summed in eight fp32 lanes as lars_kernel.cpp's sum_squares_reduced.
template <typename T, bool kReciprocal>
double mean_squares_widened(T* x, int64_t n, float k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      x[i + l] = static_cast<T>(mean_of<float, kReciprocal>(static_cast<float>(x[i + l]), k));
      const float v = static_cast<float>(x[i + l]);
      acc[l] += v * v;
    }
  double s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < n; ++i) {
    x[i] = static_cast<T>(mean_of<float, kReciprocal>(static_cast<float>(x[i]), k));
    const float v = static_cast<float>(x[i]);
    s += static_cast<double>(v) * v;
  }
  return s;
}

template <typename T, bool kReciprocal>
void mean_sum_squares_impl(void* flat, const Chunk* chunks, int64_t c0, int64_t c1, double k,
                           double* partial) {
  // k or, for a power of two, its exact reciprocal (mean_of).
  const double f = kReciprocal ? 1.0 / k : k;
  for (int64_t c = c0; c < c1; ++c) {
    T* x = static_cast<T*>(flat) + chunks[c].begin;
    const int64_t n = chunks[c].end - chunks[c].begin;
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
      partial[c] = mean_squares_same<T, kReciprocal>(x, n, static_cast<T>(f));
    } else {
      partial[c] = mean_squares_widened<T, kReciprocal>(x, n, static_cast<float>(f));
    }
  }
}

}  // namespace

// Chunks [c0, c1) of the flat buffer (Chunk.begin/end: offsets into it): x = x / k, and
// partial[c] = the sum of squares of chunk c's stored quotients.
void mean_sum_squares(c10::ScalarType dtype, void* flat, const Chunk* chunks, int64_t c0,
                      int64_t c1, double k, double* partial) {
  // A world size is an integer >= 1: a power of two when it has one bit set.
  const auto w = static_cast<int64_t>(k);
  const bool pow2 = (w & (w - 1)) == 0;
  by_dtype(dtype, [&](auto t) {
    if (pow2) {
      mean_sum_squares_impl<decltype(t), true>(flat, chunks, c0, c1, k, partial);
    } else {
      mean_sum_squares_impl<decltype(t), false>(flat, chunks, c0, c1, k, partial);
    }
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
