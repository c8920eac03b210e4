// The sum-of-squares accumulators of the CPU loops, shared so that every pass that sums a
// tensor (lars_kernel.cpp's norm pass and its update with the norm cache,
// mean_sum_squares_kernel.cpp's mean) returns the same double for the same values: the
// norm cache and the DDP norms compare these bits. Included after kernel_dispatch.h by the
// per-capability loop files only.
#pragma once

#include <cstdint>

#include "kernel_dispatch.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {  // one copy per capability's translation unit, as kernel_dispatch.h

// Sum of squares with four independent vector accumulators (latency hiding): vectors
// 4k..4k+3 of each full group of 4 go to a0..a3, the remaining full vectors to a0; lanes
// summed in double in lane order, then the scalar tail in double. Partial sums of a 64K
// chunk stay in the working precision, chunks are added in double by the host. Shared by
// the norm pass and the update that sums its new w (lars_sgd_'s norm cache): fed the same
// vectors in the same order, both return the same double.
template <typename T>
struct SquaresAcc {
  using V = Vectorized<T>;
  V a0 = V(T(0)), a1 = V(T(0)), a2 = V(T(0)), a3 = V(T(0));
  void add4(V x0, V x1, V x2, V x3) {
    a0 = at::vec::fmadd(x0, x0, a0);
    a1 = at::vec::fmadd(x1, x1, a1);
    a2 = at::vec::fmadd(x2, x2, a2);
    a3 = at::vec::fmadd(x3, x3, a3);
  }
  void add1(V x0) { a0 = at::vec::fmadd(x0, x0, a0); }
  // The sum, with the scalar tail x[i, n) (the elements after the last full vector).
  double finish(const T* x, int64_t i, int64_t n) const {
    constexpr int64_t S = V::size();
    V acc = (a0 + a1) + (a2 + a3);
    T lanes[S];
    acc.store(lanes);
    double s = 0;
    for (int64_t k = 0; k < S; ++k) s += static_cast<double>(lanes[k]);
    for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    return s;
  }
};

// fp16/bf16: eight fp32 accumulators over the stored (rounded) values, element i of each
// group of 8 to acc[i]; the tail in double. Shared like SquaresAcc.
template <typename T>
struct ReducedSquaresAcc {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  void add8(const T* x) {
    for (int k = 0; k < 8; ++k) {
      const float v = static_cast<float>(x[k]);
      acc[k] += v * v;
    }
  }
  double finish(const T* x, int64_t i, int64_t n) const {
    double s = 0;
    for (int k = 0; k < 8; ++k) s += acc[k];
    for (; i < n; ++i) s += static_cast<double>(static_cast<float>(x[i])) * static_cast<float>(x[i]);
    return s;
  }
};

}  // namespace
}  // namespace lbkernels::cpu::CPU_CAPABILITY
