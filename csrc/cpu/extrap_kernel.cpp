// Vectorised CPU loops of extrap_sgd_ and extrap_adam_ (docs/algorithms.md section 2). Built
// once per CPU capability like lars_kernel.cpp; the per-element math is
// lbkernels/extrap_math.h (shared with the CUDA kernels), the random numbers philox.h.
//
// One visit per element: the anchor update and the extrapolated point are written in the
// same pass (past_grad reads x, buf, g, gk and writes x, buf, w: 28 bytes per fp32
// element). w is only written: in tensors over stream_min_bytes() its aligned vectors go
// out through streaming stores (stream_store.h), else each line of w would first be read
// for ownership (32 bytes moved per element). The noise variants draw kBlock values at a
// time into a stack buffer and then run the same vector loop; the filter variant needs the norm of each filter's new anchor
// and of its draw before writing w, so it takes two passes over each filter (the second
// regenerates the draw, cheaper than storing it, and reads x back from cache).
#include <algorithm>
#include <type_traits>

#include <lbkernels/extrap_math.h>
#include <lbkernels/philox.h>

#include "kernel_dispatch.h"
#include "stream_store.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

// Noise values per block: 256 fp32 (1 KiB) on the stack, a multiple of every vector width.
constexpr int64_t kBlock = 256;
// Added to ||r_j|| in the filter variant (SmoothOut's normalisation; the reference's FILTER_EPS).
constexpr double kFilterEps = 1e-6;

template <typename T>
constexpr bool kFull = std::is_same_v<T, float> || std::is_same_v<T, double>;
// Arithmetic type: the tensor type for fp32/fp64, fp32 for fp16/bf16.
template <typename T>
using Opmath = std::conditional_t<kFull<T>, T, float>;

// What the update pass writes into w.
enum class Out { PastGrad, Noise, WeightNoise, None };

template <typename V, typename C>
SgdCoefs<V> sgd_coefs(const TensorCoefs& c, const SgdParams& p) {
  // Rounded to the arithmetic type first, as the reference holds them in it.
  return {V(C(p.grad_scale)), V(C(c.wd)), V(C(c.r)), V(C(1)), V(C(p.momentum)), V(C(1)),
          V(C(c.lr))};
}

// Values of elements [begin, begin + n) of one tensor's stream (philox.h layout).
template <typename Z>
void fill_noise(Z* z, int64_t begin, int64_t n, const PhiloxStream& s, bool gaussian) {
  int64_t e = begin;
  const int64_t end = begin + n;
  while (e < end) {
    float v[4];
    philox_values(s.block(static_cast<uint64_t>(e) >> 2), gaussian, v);
    for (int64_t lane = e & 3; lane < 4 && e < end; ++lane, ++e) z[e - begin] = Z(v[lane]);
  }
}

template <typename Z>
double sum_sq(const Z* z, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(z[i]) * static_cast<double>(z[i]);
  return s;
}

// One element (or vector of elements): the anchor update, then w per `out`.
template <typename V>
inline void extrap_elem(V& x, V& buf, V& w, V g, V gk, V z, const SgdCoefs<V>& c, V elr, V a,
                        Out out, bool has_scale, bool has_local, bool has_momentum,
                        bool nesterov) {
  const V g_raw = g;
  sgd_update(x, buf, g, c, has_scale, has_momentum, nesterov, false);
  switch (out) {
    case Out::PastGrad: {
      V gkk = has_local ? gk : g_raw;
      if (has_scale) gkk = gkk / c.scale;
      w = extrap_point(x, gkk, elr);
      break;
    }
    case Out::Noise: w = noise_point(x, z, a); break;
    case Out::WeightNoise: w = weight_noise_point(x, z, a); break;
    case Out::None: break;
  }
}

// The update of elements [b, b + n) of one tensor; z (noise, Opmath) is read for the
// noise outputs; *x2 accumulates the squares of the new anchor when given.
template <typename T>
void update(const ExtrapPtrs& tp, int64_t b, int64_t n, const TensorCoefs& tc,
            const ExtrapParams& p, Out out, Opmath<T> a, const Opmath<T>* z, double* x2) {
  using C = Opmath<T>;
  T* x = static_cast<T*>(tp.x) + b;
  T* w = static_cast<T*>(tp.w) + b;
  T* buf = tp.s1 != nullptr ? static_cast<T*>(tp.s1) + b : nullptr;
  const T* g = static_cast<const T*>(tp.g) + b;
  const T* gk = tp.gk != nullptr ? static_cast<const T*>(tp.gk) + b : nullptr;
  const bool hm = buf != nullptr, hl = gk != nullptr, hs = p.sgd.has_scale, nes = p.sgd.nesterov;
  const SgdCoefs<C> cs = sgd_coefs<C, C>(tc, p.sgd);
  const C elr = C(p.extrap_lr);
  int64_t i = 0;
  double sx = 0;
  if constexpr (kFull<T>) {
    using V = Vectorized<T>;
    constexpr int64_t S = V::size();
    const SgdCoefs<V> cv = sgd_coefs<V, T>(tc, p.sgd);
    const V elr_v(elr), a_v(a);
    V acc(T(0));
    // The `cnt` elements at j (a whole vector, or fewer around the streamed part), w
    // streamed when `nt`.
    auto vec = [&](int64_t j, int64_t cnt, auto nt) __attribute__((always_inline)) {
      V xv = V::loadu(x + j, cnt), bv = hm ? V::loadu(buf + j, cnt) : V(T(0)), wv(T(0));
      const V gv = V::loadu(g + j, cnt);
      const V gkv = hl ? V::loadu(gk + j, cnt) : gv;
      const V zv = z != nullptr ? V::loadu(z + j, cnt) : V(T(0));
      extrap_elem(xv, bv, wv, gv, gkv, zv, cv, elr_v, a_v, out, hs, hl, hm, nes);
      xv.store(x + j, cnt);
      if (hm) bv.store(buf + j, cnt);
      if constexpr (decltype(nt)::value) stream_store(w + j, wv);
      else if (out != Out::None) wv.store(w + j, cnt);
      if (x2 != nullptr) acc = at::vec::fmadd(xv, xv, acc);
    };
    i = vector_pass(w, n, out != Out::None && streams<T>(tp.numel), vec);
    if (x2 != nullptr) {
      T lanes[S];
      acc.store(lanes);
      for (int64_t k = 0; k < S; ++k) sx += static_cast<double>(lanes[k]);
    }
  }
  // Scalar loop: the tail of fp32/fp64, every element of fp16/bf16 (in fp32).
  for (; i < n; ++i) {
    C xv = C(x[i]), bv = hm ? C(buf[i]) : C(0), wv = C(0);
    const C gv = C(g[i]);
    const C gkv = hl ? C(gk[i]) : gv;
    const C zv = z != nullptr ? z[i] : C(0);
    extrap_elem(xv, bv, wv, gv, gkv, zv, cs, elr, a, out, hs, hl, hm, nes);
    x[i] = T(xv);
    if (hm) buf[i] = T(bv);
    if (out != Out::None) w[i] = T(wv);
    if (x2 != nullptr) sx += static_cast<double>(xv) * static_cast<double>(xv);
  }
  if (x2 != nullptr) *x2 += sx;
}

// w = x + a * z over [b, b + n) (the filter variant's second pass).
template <typename T>
void write_noise(const ExtrapPtrs& tp, int64_t b, int64_t n, Opmath<T> a, const Opmath<T>* z) {
  using C = Opmath<T>;
  const T* x = static_cast<const T*>(tp.x) + b;
  T* w = static_cast<T*>(tp.w) + b;
  int64_t i = 0;
  if constexpr (kFull<T>) {
    using V = Vectorized<T>;
    const V a_v(a);
    auto vec = [&](int64_t j, int64_t cnt, auto nt) __attribute__((always_inline)) {
      const V wv = noise_point(V::loadu(x + j, cnt), V::loadu(z + j, cnt), a_v);
      if constexpr (decltype(nt)::value) stream_store(w + j, wv);
      else wv.store(w + j, cnt);
    };
    i = vector_pass(w, n, streams<T>(tp.numel), vec);
  }
  for (; i < n; ++i) w[i] = T(noise_point(C(x[i]), z[i], a));
}

// One chunk of extrap_sgd_ with its tensor's coefficients ready.
template <typename T>
void sgd_chunk(const ExtrapPtrs& tp, int64_t b, int64_t e, const TensorCoefs& tc,
               const ExtrapParams& p) {
  using C = Opmath<T>;
  if (p.kind == Extrapolation::kPastGrad) {
    update<T>(tp, b, e - b, tc, p, Out::PastGrad, C(0), nullptr, nullptr);
    return;
  }
  const PhiloxStream stream(p.seed, p.offset, tp.index);
  const C a = C(p.noise_scale);
  C z[kBlock];
  if (p.kind != Extrapolation::kFilter) {
    const bool gaussian = p.kind == Extrapolation::kGaussian;
    const Out out = p.kind == Extrapolation::kWeight ? Out::WeightNoise : Out::Noise;
    for (int64_t blk = b; blk < e; blk += kBlock) {
      const int64_t n = std::min(kBlock, e - blk);
      fill_noise(z, blk, n, stream, gaussian);
      update<T>(tp, blk, n, tc, p, out, a, z, nullptr);
    }
    return;
  }
  // Filter: per output filter j, w = x + a * ||x_j|| / (||r_j|| + 1e-6) * r, r ~ U(-1, 1).
  for (int64_t r0 = b; r0 < e; r0 += tp.row) {
    const int64_t r1 = std::min(e, r0 + tp.row);
    double sx = 0, sr = 0;
    for (int64_t blk = r0; blk < r1; blk += kBlock) {
      const int64_t n = std::min(kBlock, r1 - blk);
      fill_noise(z, blk, n, stream, false);
      sr += sum_sq(z, n);
      update<T>(tp, blk, n, tc, p, Out::None, C(0), nullptr, &sx);
    }
    const C coef = C(p.noise_scale * std::sqrt(sx) / (std::sqrt(sr) + kFilterEps));
    for (int64_t blk = r0; blk < r1; blk += kBlock) {
      const int64_t n = std::min(kBlock, r1 - blk);
      fill_noise(z, blk, n, stream, false);
      write_noise<T>(tp, blk, n, coef, z);
    }
  }
}

template <typename T>
void extrap_sgd_impl(const ExtrapPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                     TensorCoefs* coefs, const LarsParams& lp, const ExtrapParams& p,
                     bool whole) {
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const ExtrapPtrs& tp = t[ch.tensor];
    TensorCoefs& tc = coefs[ch.tensor];
    if (whole && !tc.excluded) {
      // LARS norms of the anchor and the (still scaled) gradient, then the ratio; a
      // norm given by norm_sq is not summed (null: not read).
      const TensorPtrs norm_ptrs{tc.given_w2 < 0 ? tp.x : nullptr,
                                 tc.given_g2 < 0 ? tp.g : nullptr, nullptr, tp.numel};
      const Chunk all{0, ch.begin, ch.end};
      double sums[2];
      sum_squares(c10::CppTypeToScalarType<T>::value, &norm_ptrs, &all, 0, 1, sums);
      lars_coefs(sums[0], sums[1], lp, p.sgd, tc);
    }
    sgd_chunk<T>(tp, ch.begin, ch.end, tc, p);
  }
  stream_fence();
}

template <typename V, typename C>
AdamCoefs<V> adam_coefs(const AdamTensorCoefs& tc, const AdamParams& p) {
  const C w1 = C(1.0 - p.beta1);
  return {V(C(p.grad_scale)), V(C(p.weight_decay)), V(C(p.decay)), V(w1), V(C(1) - w1),
          V(C(p.beta2)),      V(C(1.0 - p.beta2)),  V(C(tc.step_size)), V(C(tc.bc2_sqrt)),
          V(C(p.eps)),        V(C(p.extrap_lr))};
}

template <typename T>
void extrap_adam_impl(const ExtrapPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
                      const AdamTensorCoefs* coefs, const AdamParams& p) {
  using C = Opmath<T>;
  const AdamFlags f{p.has_scale, p.has_local, p.weight_decay != 0.0, p.decoupled,
                    C(1.0 - p.beta1) < C(0.5)};
  for (int64_t c = c0; c < c1; ++c) {
    const Chunk& ch = chunks[c];
    const ExtrapPtrs& tp = t[ch.tensor];
    const int64_t n = ch.end - ch.begin;
    T* x = static_cast<T*>(tp.x) + ch.begin;
    T* w = static_cast<T*>(tp.w) + ch.begin;
    T* m = static_cast<T*>(tp.s1) + ch.begin;
    T* v = static_cast<T*>(tp.s2) + ch.begin;
    const T* g = static_cast<const T*>(tp.g) + ch.begin;
    const T* gk = tp.gk != nullptr ? static_cast<const T*>(tp.gk) + ch.begin : g;
    const AdamCoefs<C> cs = adam_coefs<C, C>(coefs[ch.tensor], p);
    int64_t i = 0;
    if constexpr (kFull<T>) {
      using V = Vectorized<T>;
      const AdamCoefs<V> cv = adam_coefs<V, T>(coefs[ch.tensor], p);
      auto vec = [&](int64_t j, int64_t cnt, auto nt) __attribute__((always_inline)) {
        V xv = V::loadu(x + j, cnt), mv = V::loadu(m + j, cnt), vv = V::loadu(v + j, cnt), wv(T(0));
        extrap_adam_update(xv, mv, vv, wv, V::loadu(g + j, cnt), V::loadu(gk + j, cnt), cv, f);
        xv.store(x + j, cnt);
        mv.store(m + j, cnt);
        vv.store(v + j, cnt);
        if constexpr (decltype(nt)::value) stream_store(w + j, wv);
        else wv.store(w + j, cnt);
      };
      i = vector_pass(w, n, streams<T>(tp.numel), vec);
    }
    for (; i < n; ++i) {
      C xv = C(x[i]), mv = C(m[i]), vv = C(v[i]), wv = C(0);
      extrap_adam_update(xv, mv, vv, wv, C(g[i]), C(gk[i]), cs, f);
      x[i] = T(xv);
      m[i] = T(mv);
      v[i] = T(vv);
      w[i] = T(wv);
    }
  }
  stream_fence();
}

}  // namespace

void extrap_sgd(c10::ScalarType dtype, const ExtrapPtrs* tensors, const Chunk* chunks,
                int64_t c0, int64_t c1, TensorCoefs* coefs, const LarsParams& lp,
                const ExtrapParams& p, bool whole) {
  by_dtype(dtype, [&](auto t) {
    extrap_sgd_impl<decltype(t)>(tensors, chunks, c0, c1, coefs, lp, p, whole);
  });
}

void extrap_adam(c10::ScalarType dtype, const ExtrapPtrs* tensors, const Chunk* chunks,
                 int64_t c0, int64_t c1, const AdamTensorCoefs* coefs, const AdamParams& p) {
  by_dtype(dtype, [&](auto t) {
    extrap_adam_impl<decltype(t)>(tensors, chunks, c0, c1, coefs, p);
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
