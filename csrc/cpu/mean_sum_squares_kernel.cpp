// Vectorised CPU loop of mean_sum_squares_ (docs/algorithms.md section 1.1): g = sum / k
// in place, and the sum of squares of the stored g, in one visit of each element. This
// file is compiled once per CPU capability (DEFAULT, AVX2, AVX512) like lars_kernel.cpp;
// lbkernels/cpu_kernels.h declares it for each, and the host picks it from kernels().
//
// The sums are taken by lars_kernel.cpp's accumulators (squares_acc.h: four vector
// accumulators in the working precision within a 64K chunk, the chunk's lanes and tail
// added in double), so the norm handed to lars_sgd_ is the one its own pass would find
// up to the order of the chunks' lanes.
#include <type_traits>

#include <lbkernels/math.h>

#include "kernel_dispatch.h"
#include "squares_acc.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

// fp32/fp64: full vectors (four in flight), then a scalar tail with the same expression.
template <typename T>
double mean_squares_same(T* x, int64_t n, T k) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const V kv(k);
  // The vector at i, divided and stored; returns the stored quotient.
  auto mean = [&](int64_t i) {
    const V q = lbkernels::worker_mean(V::loadu(x + i), kv);
    q.store(x + i);
    return q;
  };
  SquaresAcc<T> acc;
  int64_t i = 0;
  for (; i + 4 * S <= n; i += 4 * S) {
    const V x0 = mean(i), x1 = mean(i + S), x2 = mean(i + 2 * S), x3 = mean(i + 3 * S);
    acc.add4(x0, x1, x2, x3);
  }
  for (; i + S <= n; i += S) acc.add1(mean(i));
  for (int64_t j = i; j < n; ++j) x[j] = lbkernels::worker_mean(x[j], k);
  return acc.finish(x, i, n);
}

// fp16/bf16: the quotient in fp32, rounded once to T; the square of the rounded value,
// summed in eight fp32 lanes as lars_kernel.cpp's sum_squares_reduced.
template <typename T>
double mean_squares_widened(T* x, int64_t n, float k) {
  auto mean = [&](int64_t j) {
    x[j] = static_cast<T>(lbkernels::worker_mean(static_cast<float>(x[j]), k));
  };
  ReducedSquaresAcc<T> acc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t j = i; j < i + 8; ++j) mean(j);
    acc.add8(x + i);
  }
  for (int64_t j = i; j < n; ++j) mean(j);
  return acc.finish(x, i, n);
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

void mean_sum_squares(c10::ScalarType dtype, void* flat, const Chunk* chunks, int64_t c0,
                      int64_t c1, double k, double* partial) {
  by_dtype(dtype, [&](auto t) {
    mean_sum_squares_impl<decltype(t)>(flat, chunks, c0, c1, k, partial);
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
