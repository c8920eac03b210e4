// Vectorised CPU loops of the SGD family (sum of squares, fused update). This file is
// compiled once per CPU capability with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512
// (and the matching -m flags), like ATen's own kernels: at::vec::Vectorized is 16 floats
// wide only when built with CPU_CAPABILITY_AVX512, whatever -march says.
#include <type_traits>

#include <lbkernels/math.h>

#include "kernel_dispatch.h"
#include "squares_acc.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

template <typename V, typename T>
SgdCoefs<V> broadcast(const TensorCoefs& c, const SgdParams& p) {
  // Coefficients are rounded to T before broadcasting, as the reference holds them in T.
  return {V(T(p.grad_scale)), V(T(c.wd)),  V(T(c.r)),
          V(T(c.pre)),        V(T(p.momentum)), V(T(c.first ? 1.0 : 1.0 - p.dampening)),
          V(T(c.lr))};
}

// The averaging weight of a folded update, in the arithmetic type T.
template <typename T>
T average_r(const SgdParams& p) {
  if constexpr (std::is_same_v<T, double>) {
    return p.average_r64;
  } else {
    return p.average_r32;
  }
}

// float/double: full vectors, then a scalar tail with the same math. With `avg` (the
// folded averaging, same dtype as w here) the new w is averaged in while in registers.
// kSum: also returns the sum of squares of the new w exactly as sum_squares_range would
// sum it (same vectors to the same accumulators); without, the loop is unchanged.
template <typename T, bool kSum>
double update_range(T* w, const T* g, T* buf, T* avg, int64_t n, const TensorCoefs& tc,
                    const SgdParams& p) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  const SgdCoefs<V> cv = broadcast<V, T>(tc, p);
  const SgdCoefs<T> cs = broadcast<T, T>(tc, p);
  const T r = average_r<T>(p);
  const V rv(r);
  const V zero(T(0));
  // The vector at i, updated and stored; returns the new w.
  auto step = [&](int64_t i, auto has_buf) {
    V wv = V::loadu(w + i);
    if constexpr (decltype(has_buf)::value) {
      V bv = V::loadu(buf + i);
      sgd_update(wv, bv, V::loadu(g + i), cv, p.has_scale, true, p.nesterov, tc.first);
      bv.store(buf + i);
    } else {
      V bv = zero;
      sgd_update(wv, bv, V::loadu(g + i), cv, p.has_scale, false, false, false);
    }
    wv.store(w + i);
    if (avg != nullptr) lbkernels::average_update(V::loadu(avg + i), wv, rv).store(avg + i);
    return wv;
  };
  SquaresAcc<T> acc;
  auto vectors = [&](auto has_buf) {
    int64_t i = 0;
    if constexpr (kSum) {
      for (; i + 4 * S <= n; i += 4 * S) {
        const V x0 = step(i, has_buf), x1 = step(i + S, has_buf), x2 = step(i + 2 * S, has_buf),
                x3 = step(i + 3 * S, has_buf);
        acc.add4(x0, x1, x2, x3);
      }
      for (; i + S <= n; i += S) acc.add1(step(i, has_buf));
    } else {
      for (; i + S <= n; i += S) step(i, has_buf);
    }
    return i;
  };
  const int64_t tail = buf != nullptr ? vectors(std::true_type{}) : vectors(std::false_type{});
  for (int64_t i = tail; i < n; ++i) {
    T b = buf != nullptr ? buf[i] : T(0);
    sgd_update(w[i], b, g[i], cs, p.has_scale, buf != nullptr, p.nesterov, tc.first);
    if (buf != nullptr) buf[i] = b;
    if (avg != nullptr) avg[i] = lbkernels::average_update(avg[i], w[i], r);
  }
  if constexpr (kSum) {
    return acc.finish(w, tail, n);
  } else {
    return 0;
  }
}

// fp16/bf16: fp32 arithmetic on converted values (scalar; the compiler vectorises the
// conversions where it can). kSum: as update_range, summed as sum_squares_reduced sums.
template <typename T, bool kSum>
double update_range_reduced(T* w, const T* g, T* buf, float* avg, int64_t n,
                            const TensorCoefs& tc, const SgdParams& p) {
  const SgdCoefs<float> cs = broadcast<float, float>(tc, p);
  const bool has_momentum = buf != nullptr;
  auto elem = [&](int64_t i) {
    float wf = static_cast<float>(w[i]);
    float bf = has_momentum ? static_cast<float>(buf[i]) : 0.f;
    sgd_update(wf, bf, static_cast<float>(g[i]), cs, p.has_scale, has_momentum, p.nesterov,
               tc.first);
    w[i] = static_cast<T>(wf);
    if (has_momentum) buf[i] = static_cast<T>(bf);
    // The stored (rounded) weight is averaged, as average_ would read it.
    if (avg != nullptr) avg[i] = lbkernels::average_update(avg[i], static_cast<float>(w[i]), p.average_r32);
  };
  if constexpr (kSum) {
    ReducedSquaresAcc<T> acc;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      for (int64_t k = i; k < i + 8; ++k) elem(k);
      acc.add8(w + i);
    }
    for (int64_t k = i; k < n; ++k) elem(k);
    return acc.finish(w, i, n);
  } else {
    for (int64_t i = 0; i < n; ++i) elem(i);
    return 0;
  }
}

template <typename T>
double sum_squares_range(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t S = V::size();
  SquaresAcc<T> acc;
  int64_t i = 0;
  for (; i + 4 * S <= n; i += 4 * S)
    acc.add4(V::loadu(x + i), V::loadu(x + i + S), V::loadu(x + i + 2 * S), V::loadu(x + i + 3 * S));
  for (; i + S <= n; i += S) acc.add1(V::loadu(x + i));
  return acc.finish(x, i, n);
}

template <typename T>
double sum_squares_reduced(const T* x, int64_t n) {
  ReducedSquaresAcc<T> acc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc.add8(x + i);
  return acc.finish(x, i, n);
}

template <typename T>
double squares(const void* base, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(base) + begin;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return sum_squares_range(x, end - begin);
  } else {
    return sum_squares_reduced(x, end - begin);
  }
}

template <typename T>
void sum_squares_impl(const TensorPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                      double* out) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const TensorPtrs& tp = t[ch.tensor];
    out[2 * c] = tp.w != nullptr ? squares<T>(tp.w, ch.begin, ch.end) : 0.0;
    out[2 * c + 1] = tp.g != nullptr ? squares<T>(tp.g, ch.begin, ch.end) : 0.0;
  }
}

template <typename T>
void sgd_update_impl(const TensorPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                     const TensorCoefs* coefs, const SgdParams& p, double* new_w2) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const TensorPtrs& tp = t[ch.tensor];
    const TensorCoefs& tc = coefs[ch.tensor];
    const bool sum = new_w2 != nullptr && !tc.excluded;  // the norm cache holds adapted tensors only
    const int64_t n = ch.end - ch.begin;
    T* w = static_cast<T*>(tp.w) + ch.begin;
    const T* g = static_cast<const T*>(tp.g) + ch.begin;
    T* buf = tp.buf != nullptr ? static_cast<T*>(tp.buf) + ch.begin : nullptr;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      T* avg = tp.avg != nullptr ? static_cast<T*>(tp.avg) + ch.begin : nullptr;
      if (sum) {
        new_w2[c] = update_range<T, true>(w, g, buf, avg, n, tc, p);
      } else {
        update_range<T, false>(w, g, buf, avg, n, tc, p);
      }
    } else {
      float* avg = tp.avg != nullptr ? static_cast<float*>(tp.avg) + ch.begin : nullptr;
      if (sum) {
        new_w2[c] = update_range_reduced<T, true>(w, g, buf, avg, n, tc, p);
      } else {
        update_range_reduced<T, false>(w, g, buf, avg, n, tc, p);
      }
    }
  }
}

template <typename T>
void lars_whole_impl(const TensorPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                     TensorCoefs* coefs, const LarsParams& lp, const SgdParams& p,
                     double* new_w2) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    TensorCoefs& tc = coefs[ch.tensor];
    const TensorPtrs& tp = t[ch.tensor];
    if (!tc.excluded) {
      // A norm given by norm_sq or the norm cache is not summed: no read of that tensor for it.
      lars_coefs(tc.given_w2 < 0 ? squares<T>(tp.w, ch.begin, ch.end) : 0.0,
                 tc.given_g2 < 0 ? squares<T>(tp.g, ch.begin, ch.end) : 0.0, lp, p, tc);
    } else {
      lars_coefs(0, 0, lp, p, tc);
    }
    sgd_update_impl<T>(t, chunks, c, c + 1, coefs, p, new_w2);
  }
}

}  // namespace

void lars_whole(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,
                int64_t c0, int64_t c1, TensorCoefs* coefs, const LarsParams& lp,
                const SgdParams& p, double* new_w2) {
  by_dtype(dtype, [&](auto t) {
    lars_whole_impl<decltype(t)>(tensors, chunks, c0, c1, coefs, lp, p, new_w2);
  });
}

void sum_squares(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,
                 int64_t c0, int64_t c1, double* out) {
  by_dtype(dtype, [&](auto t) { sum_squares_impl<decltype(t)>(tensors, chunks, c0, c1, out); });
}

void sgd_update(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,
                int64_t c0, int64_t c1, const TensorCoefs* coefs, const SgdParams& p,
                double* new_w2) {
  by_dtype(dtype, [&](auto t) {
    sgd_update_impl<decltype(t)>(tensors, chunks, c0, c1, coefs, p, new_w2);
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
