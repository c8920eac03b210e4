// Vectorised CPU loops of average_ (docs/algorithms.md section 4): avg += r * (w - avg), and
// of worker_mean_: w = sum / k. This file is compiled once per CPU capability (DEFAULT,
// AVX2, AVX512) like lars_kernel.cpp.
//
// The update reads w and avg and writes avg: 12 bytes per fp32 parameter, memory-bound,
// so the loop only has to keep full vectors in flight; it allocates nothing.
#include <type_traits>

#include <lbkernels/math.h>

#include "kernel_dispatch.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

// fp32 params into fp32 averages, fp64 into fp64: full vectors, then a scalar tail with
// the same expression.
template <typename T>
void average_same(T* avg, const T* w, int64_t n, T r) {
  using V = Vectorized<T>;
  const V rv(r);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size())
    lbkernels::average_update(V::loadu(avg + i), V::loadu(w + i), rv).store(avg + i);
  for (; i < n; ++i) avg[i] = lbkernels::average_update(avg[i], w[i], r);
}

// fp16/bf16 params into fp32 averages: widen, then the fp32 expression (scalar; the
// compiler vectorises the conversions where it can).
template <typename T>
void average_widened(float* avg, const T* w, int64_t n, float r) {
  for (int64_t i = 0; i < n; ++i) avg[i] = lbkernels::average_update(avg[i], static_cast<float>(w[i]), r);
}

template <typename T>
void average_impl(const TensorPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                  const AverageParams& p) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const TensorPtrs& tp = t[ch.tensor];
    const T* w = static_cast<const T*>(tp.g) + ch.begin;
    const int64_t n = ch.end - ch.begin;
    if constexpr (std::is_same_v<T, double>) {
      average_same(static_cast<double*>(tp.w) + ch.begin, w, n, p.r64);
    } else if constexpr (std::is_same_v<T, float>) {
      average_same(static_cast<float*>(tp.w) + ch.begin, w, n, p.r32);
    } else {
      average_widened(static_cast<float*>(tp.w) + ch.begin, w, n, p.r32);
    }
  }
}

// w = sum / k: full vectors for fp32/fp64, then a scalar tail with the same expression.
template <typename T>
void mean_same(T* w, const T* sum, int64_t n, T k) {
  using V = Vectorized<T>;
  const V kv(k);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size())
    lbkernels::worker_mean(V::loadu(sum + i), kv).store(w + i);
  for (; i < n; ++i) w[i] = lbkernels::worker_mean(sum[i], k);
}

// fp16/bf16: the quotient in fp32, rounded once to T.
template <typename T>
void mean_widened(T* w, const T* sum, int64_t n, float k) {
  for (int64_t i = 0; i < n; ++i)
    w[i] = static_cast<T>(lbkernels::worker_mean(static_cast<float>(sum[i]), k));
}

template <typename T>
void worker_mean_impl(const TensorPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                      double k) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const TensorPtrs& tp = t[ch.tensor];
    T* w = static_cast<T*>(tp.w) + ch.begin;
    const T* sum = static_cast<const T*>(tp.g) + ch.begin;
    const int64_t n = ch.end - ch.begin;
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
      mean_same<T>(w, sum, n, static_cast<T>(k));
    } else {
      mean_widened<T>(w, sum, n, static_cast<float>(k));
    }
  }
}

}  // namespace

void worker_mean(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks, int64_t c0,
                 int64_t c1, double k) {
  by_dtype(dtype, [&](auto t) { worker_mean_impl<decltype(t)>(tensors, chunks, c0, c1, k); });
}

void average_update(c10::ScalarType param_dtype, const TensorPtrs* tensors, const Chunk* chunks,
                    int64_t c0, int64_t c1, const AverageParams& p) {
  by_dtype(param_dtype, [&](auto t) { average_impl<decltype(t)>(tensors, chunks, c0, c1, p); });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
