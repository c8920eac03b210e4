// Vectorised CPU loops of lamb_ (docs/algorithms.md section 7). Built once per CPU
// capability like lars_kernel.cpp; the per-element math is lbkernels/lamb_math.h (shared
// with the CUDA kernels).
//
// LAMB needs ||u|| before it may write w, so every element is visited twice:
//  * pass 1 (kNorms) reads g, w, m, v, computes the new moments and u, and sums w^2 and
//    u^2. fp32/fp64 tensors store the new m, v here (exact in their own type), so pass 2
//    only recomputes u from them; fp16/bf16 tensors store nothing, because the reference
//    takes u from the unrounded moments: pass 2 recomputes the moments from g as well,
//    on the same inputs, so both passes see the same u bit for bit;
//  * pass 2 (kWrite) writes w = w - lr * r * u (and the moments of 16-bit tensors, the
//    folded average), walking its chunks in reverse so that it starts on the data pass 1
//    touched last, still in cache (lamb.cpp explains the blocking).
// An excluded tensor (r = 1) needs no norms: pass 2 alone does everything in one visit.
// The stages of lamb_ run one pass each: kMoments is pass 1 storing the moments of every
// dtype (a 16-bit tensor's norms still from the unrounded ones, as the full step), over
// excluded tensors too; kUpdate is pass 2 from the stored moments of every dtype.
#include <cmath>
#include <type_traits>

#include <lbkernels/lamb_math.h>

#include "kernel_dispatch.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
constexpr bool kFull = std::is_same_v<T, float> || std::is_same_v<T, double>;
// Arithmetic type: the tensor type for fp32/fp64, fp32 for fp16/bf16.
template <typename T>
using Opmath = std::conditional_t<kFull<T>, T, float>;

template <typename V, typename C>
LambCoefs<V> broadcast(const LambCoefs<C>& c) {
  return {V(c.scale), V(c.clip), V(c.wd),  V(c.b1),  V(c.b3), V(c.b3c),
          V(c.b2),    V(c.w2),   V(c.bc1), V(c.bc2), V(c.eps)};
}

template <typename C>
C average_weight(const AverageParams& a) {
  if constexpr (std::is_same_v<C, double>) {
    return a.r64;
  } else {
    return a.r32;
  }
}

// u of one element, lamb_direction's rule with its divisions by bc1 and bc2 made
// multiplications by their reciprocals (rb1 = 1 / bc1, rb2 = 1 / bc2, each rounded once
// per tensor): one division and one square root per element where lamb_direction has
// three divisions. Measured alone on one core, AVX-512, a pass over 64K fp32 elements in
// L2: 0.48 ns per element with the three divisions, 0.28 with one (0.13 with none). Each
// change is ~1 ulp of u (the tests' fp32 tolerance is 1e-5 relative after 7 steps);
// both passes call this function on the same inputs, so they still see the same u.
template <typename V>
V direction(V m, V v, V w, const LambCoefs<V>& c, V rb1, V rb2, const LambFlags& f) {
  const V denom = f.apex ? lbk_sqrt(v * rb2) + c.eps : lbk_sqrt(v) * rb2 + c.eps;
  V u = (m * rb1) / denom;
  if (f.decoupled) u = u + c.wd * w;
  return u;
}

// The typed pointers of elements [b, e) of one tensor.
template <typename T>
struct Range {
  T* w;
  const T* g;
  T* m;
  T* v;
  Opmath<T>* avg;  // null without averaging
  int64_t n;
  Range(const LambPtrs& p, int64_t b, int64_t e)
      : w(static_cast<T*>(p.w) + b),
        g(p.g != nullptr ? static_cast<const T*>(p.g) + b : nullptr),  // null: kUpdate
        m(static_cast<T*>(p.m) + b), v(static_cast<T*>(p.v) + b),
        avg(p.avg != nullptr ? static_cast<Opmath<T>*>(p.avg) + b : nullptr), n(e - b) {}
};

// Pass 1 over one range: adds sum(w^2) and sum(u^2) to sums[0], sums[1] (vector lanes in
// the working precision within the range, at most one 64K chunk; added in double).
// `store16`: 16-bit moments are stored too (rounded), after u took the unrounded ones.
template <typename T>
void norms(const Range<T>& x, const LambCoefs<Opmath<T>>& cs, const LambFlags& f,
           double* sums, bool store16) {
  using C = Opmath<T>;
  const C rb1 = C(1) / cs.bc1, rb2 = C(1) / cs.bc2;
  int64_t i = 0;
  if constexpr (kFull<T>) {
    using V = Vectorized<T>;
    const LambCoefs<V> cv = broadcast<V>(cs);
    const V rb1v(rb1), rb2v(rb2);
    V aw(T(0)), au(T(0));
    for (; i + V::size() <= x.n; i += V::size()) {
      const V w = V::loadu(x.w + i);
      V m = V::loadu(x.m + i), v = V::loadu(x.v + i);
      lamb_moments(m, v, V::loadu(x.g + i), w, cv, f);
      const V u = direction(m, v, w, cv, rb1v, rb2v, f);
      m.store(x.m + i);
      v.store(x.v + i);
      aw = at::vec::fmadd(w, w, aw);
      au = at::vec::fmadd(u, u, au);
    }
    T lw[V::size()], lu[V::size()];
    aw.store(lw);
    au.store(lu);
    for (int64_t k = 0; k < V::size(); ++k) {
      sums[0] += static_cast<double>(lw[k]);
      sums[1] += static_cast<double>(lu[k]);
    }
  }
  for (; i < x.n; ++i) {
    const C w = C(x.w[i]);
    C m = C(x.m[i]), v = C(x.v[i]);
    lamb_moments(m, v, C(x.g[i]), w, cs, f);
    const C u = direction(m, v, w, cs, rb1, rb2, f);
    if (kFull<T> || store16) {
      x.m[i] = T(m);
      x.v[i] = T(v);
    }
    sums[0] += static_cast<double>(w) * static_cast<double>(w);
    sums[1] += static_cast<double>(u) * static_cast<double>(u);
  }
}

// Pass 2 over one range: w = w - lr * r * u, and the folded average of the stored w.
// `fresh`: the moments are still the old ones (16-bit tensors, excluded tensors), so they
// are updated and stored here.
template <typename T>
void write(const Range<T>& x, const LambCoefs<Opmath<T>>& cs, const LambFlags& f, Opmath<T> lr,
           Opmath<T> r, Opmath<T> avg_r, bool fresh) {
  using C = Opmath<T>;
  const C rb1 = C(1) / cs.bc1, rb2 = C(1) / cs.bc2;
  int64_t i = 0;
  if constexpr (kFull<T>) {
    using V = Vectorized<T>;
    const LambCoefs<V> cv = broadcast<V>(cs);
    const V lrv(lr), rv(r), avg_rv(avg_r), rb1v(rb1), rb2v(rb2);
    for (; i + V::size() <= x.n; i += V::size()) {
      V w = V::loadu(x.w + i), m = V::loadu(x.m + i), v = V::loadu(x.v + i);
      if (fresh) {
        lamb_moments(m, v, V::loadu(x.g + i), w, cv, f);
        m.store(x.m + i);
        v.store(x.v + i);
      }
      w = lamb_write(w, direction(m, v, w, cv, rb1v, rb2v, f), lrv, rv, f.apex);
      w.store(x.w + i);
      if (x.avg != nullptr)
        lbkernels::average_update(V::loadu(x.avg + i), w, avg_rv).store(x.avg + i);
    }
  }
  for (; i < x.n; ++i) {
    C w = C(x.w[i]), m = C(x.m[i]), v = C(x.v[i]);
    if (fresh) {
      lamb_moments(m, v, C(x.g[i]), w, cs, f);
      x.m[i] = T(m);
      x.v[i] = T(v);
    }
    x.w[i] = T(lamb_write(w, direction(m, v, w, cs, rb1, rb2, f), lr, r, f.apex));
    // The stored (rounded) weight is averaged, as average_ would read it.
    if (x.avg != nullptr) x.avg[i] = lbkernels::average_update(x.avg[i], C(x.w[i]), avg_r);
  }
}

template <typename T>
void lamb_impl(const LambPtrs* t, const Chunk* chunks, int64_t c0, int64_t c1,
               LambTensorCoefs* coefs, const LambParams& p, LambPass pass, double* out) {
  using C = Opmath<T>;
  const C lr = C(p.o.lr);
  const C avg_r = average_weight<C>(p.average);
  for (int64_t j = c0; j < c1; ++j) {
    // Pass 2 walks its chunks backwards (the data pass 1 touched last first).
    const int64_t c = pass == LambPass::kWrite ? c0 + c1 - 1 - j : j;
    const Chunk& ch = chunks[c];
    LambTensorCoefs& tc = coefs[ch.tensor];
    const Range<T> x(t[ch.tensor], ch.begin, ch.end);
    const LambCoefs<C> cs = lamb_coefs<C>(p.o, tc.t, C(p.grad_scale), C(p.clip));
    const LambFlags f = lamb_flags(p.o, cs);
    if (pass == LambPass::kNorms || pass == LambPass::kMoments) {
      out[2 * c] = out[2 * c + 1] = 0.0;
      norms<T>(x, cs, f, out + 2 * c, pass == LambPass::kMoments);
      continue;
    }
    if (pass == LambPass::kWhole && !tc.excluded) {
      double sums[2] = {0.0, 0.0};
      norms<T>(x, cs, f, sums, false);
      lamb_set_ratio(sums[0], sums[1], p, tc);
    }
    const bool fresh = pass != LambPass::kUpdate && (!kFull<T> || tc.excluded);
    write<T>(x, cs, f, lr, C(tc.r), avg_r, fresh);
  }
}

}  // namespace

void lamb(c10::ScalarType dtype, const LambPtrs* tensors, const Chunk* chunks, int64_t c0,
          int64_t c1, LambTensorCoefs* coefs, const LambParams& p, LambPass pass, double* out) {
  by_dtype(dtype, [&](auto t) {
    lamb_impl<decltype(t)>(tensors, chunks, c0, c1, coefs, p, pass, out);
  });
}

}  // namespace lbkernels::cpu::CPU_CAPABILITY
