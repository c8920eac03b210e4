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

// fp32/fp64: full vectors (four in flight), then a scalar tail with the same expression.
template <typename T>
double mean_squares_same(T* x, int64_t n, T k) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const V kv(k);
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t i = 0;
  for (; i + 4 * S <= n; i += 4 * S) {
    const V x0 = lbkernels::worker_mean(V::loadu(x + i), kv);
    const V x1 = lbkernels::worker_mean(V::loadu(x + i + S), kv);
    const V x2 = lbkernels::worker_mean(V::loadu(x + i + 2 * S), kv);
    const V x3 = lbkernels::worker_mean(V::loadu(x + i + 3 * S), kv);
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
    const V x0 = lbkernels::worker_mean(V::loadu(x + i), kv);
    x0.store(x + i);
    a0 = at::vec::fmadd(x0, x0, a0);
  }
  const V acc = (a0 + a1) + (a2 + a3);
  T lanes[S];
  acc.store(lanes);
  double s = 0;
  for (int64_t l = 0; l < S; ++l) s += static_cast<double>(lanes[l]);
  for (; i < n; ++i) {
    x[i] = lbkernels::worker_mean(x[i], k);
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
  return s;
}

// fp16/bf16: the quotient in fp32, rounded once to T; the square of the rounded value,
// summed in eight fp32 lanes as lars_kernel.cpp's sum_squares_reduced.
template <typename T>
double mean_squares_widened(T* x, int64_t n, float k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      x[i + l] = static_cast<T>(lbkernels::worker_mean(static_cast<float>(x[i + l]), k));
      const float v = static_cast<float>(x[i + l]);
      acc[l] += v * v;
    }
  double s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; i < n; ++i) {
    x[i] = static_cast<T>(lbkernels::worker_mean(static_cast<float>(x[i]), k));
    const float v = static_cast<float>(x[i]);
    s += static_cast<double>(v) * v;
  }
  return s;
}

template <typename T>
void mean_sum_squares_impl(void* flat, const Chunk* chunks, int64_t c0, int64_t c1, double k,
                           double* partial) {
  for (int64_t c = c0; c < c1; ++c) {
    T* x = static_cast<T*>(flat) + chunks[c].begin;
    const int64_t n = chunks[c].end - chunks[c].begin;
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
      partial[c] = mean_squares_same<T>(x, n, static_cast<T>(k));
    } else {
      partial[c] = mean_squares_widened<T>(x, n, static_cast<float>(k));
    }
  }
}

}  // namespace

// Chunks [c0, c1) of the flat buffer (Chunk.begin/end: offsets into it): x = x / k, and
// partial[c] = the sum of squares of chunk c's stored quotients.
void mean_sum_squares(c10::ScalarType dtype, void* flat, const Chunk* chunks, int64_t c0,
                      int64_t c1, double k, double* partial) {
  by_dtype(dtype, [&](auto t) {
    mean_sum_squares_impl<decltype(t)>(flat, chunks, c0, c1, k, partial);
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
