// CUDA functors of extrap_adam_ (docs/algorithms.md section 2.2): AdamBiasPass (a block per
// tensor: step += 1, bias corrections), then ExtrapAdamUpdate (a block per chunk). The
// per-element math is lbkernels/extrap_math.h, shared with the CPU kernels. The AMP
// found_inf flag is read on the device by every block: when set, nothing is written.
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cstdint>

#include <lbkernels/extrap_math.h>

#include "common.cuh"

namespace lbkernels::cuda {

// Bias corrections of one tensor's step, written by AdamBiasPass (fp64, as
// torch.optim.Adam computes them with Python floats).
struct AdamBias {
  double bc1;       // 1 - beta1^t
  double bc2_sqrt;  // sqrt(1 - beta2^t)
};

// Pass 1 of extrap_adam_ (a block per tensor, empty ones included): step += 1 on the
// fp32 counter (list 0), then the corrections of the new step.
struct AdamBiasPass {
  AdamBias* bias;
  double beta1, beta2;
  DeviceScalar found_inf;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    if (found_inf.nonzero() || threadIdx.x != 0) return;  // a skipped step counts nothing
    float* step = static_cast<float*>(meta.addresses[0][slot]);
    const float t = *step + 1.f;
    *step = t;
    AdamBias& b = bias[meta.index[slot]];
    b.bc1 = 1.0 - pow(beta1, static_cast<double>(t));
    b.bc2_sqrt = sqrt_rn(1.0 - pow(beta2, static_cast<double>(t)));
  }
};

// Pass 2 of extrap_adam_: lists w, x, exp_avg, exp_avg_sq, g, gk (null when the op got
// no local gradients: gk = g).
template <typename T>
struct ExtrapAdamUpdate {
  using A = opmath_t<T>;
  const AdamBias* bias;
  double lr, extrap_lr, beta1, beta2, eps, weight_decay;
  DeviceScalar lr_tensor, extrap_lr_tensor, grad_scale, found_inf;
  bool decoupled;

  // The constants in the reference's precision: lr / bc1 in fp64 (lr first rounded to A
  // when it is a tensor), 1 - lr * wd in fp64 for a float lr and in A for a tensor.
  __device__ __forceinline__ AdamCoefs<A> coefs_of(const AdamBias& b) const {
    const bool lr_dev = lr_tensor.set();
    const A lr_a = lr_dev ? lr_tensor.get<A>() : static_cast<A>(lr);
    const double lr_d = lr_dev ? static_cast<double>(lr_a) : lr;
    const A w1 = static_cast<A>(1.0 - beta1);
    return AdamCoefs<A>{
        grad_scale.set() ? grad_scale.get<A>() : A(1),
        static_cast<A>(weight_decay),
        lr_dev ? A(1) - lr_a * static_cast<A>(weight_decay) : static_cast<A>(1.0 - lr * weight_decay),
        w1,
        A(1) - w1,
        static_cast<A>(beta2),
        static_cast<A>(1.0 - beta2),
        static_cast<A>(lr_d / b.bc1),
        static_cast<A>(b.bc2_sqrt),
        static_cast<A>(eps),
        extrap_lr_tensor.set() ? extrap_lr_tensor.get<A>() : static_cast<A>(extrap_lr)};
  }

  __device__ __forceinline__ void operator()(const TensorListMeta<6>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    const AdamCoefs<A> c = coefs_of(bias[meta.index[slot]]);
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    T* x = static_cast<T*>(meta.addresses[1][slot]) + begin;
    T* m = static_cast<T*>(meta.addresses[2][slot]) + begin;
    T* v = static_cast<T*>(meta.addresses[3][slot]) + begin;
    const T* g = static_cast<const T*>(meta.addresses[4][slot]) + begin;
    const T* gk = meta.addresses[5][slot] != nullptr
                      ? static_cast<const T*>(meta.addresses[5][slot]) + begin
                      : nullptr;
    const AdamFlags f{grad_scale.set(), gk != nullptr, weight_decay != 0.0, decoupled,
                      c.w1 < A(0.5)};
    // One element, in the arithmetic type: updates x, m, v, returns w.
    auto update = [&](A& xv, A& mv, A& vv, A gv, A gkv) -> A {
      A wv;
      extrap_adam_update(xv, mv, vv, wv, gv, gkv, c, f);
      return wv;
    };
    int64_t i = 0;
    if (pack_aligned(w) && pack_aligned(x) && pack_aligned(m) && pack_aligned(v) &&
        pack_aligned(g) && (gk == nullptr || pack_aligned(gk))) {
      const int64_t n_packs = n / kPack;
      for (int64_t q = threadIdx.x; q < n_packs; q += blockDim.x) {
        Pack<T> wk, gkk;
        Pack<T> xk = reinterpret_cast<const Pack<T>*>(x)[q];
        Pack<T> mk = reinterpret_cast<const Pack<T>*>(m)[q];
        Pack<T> vk = reinterpret_cast<const Pack<T>*>(v)[q];
        const Pack<T> gp = reinterpret_cast<const Pack<T>*>(g)[q];
        if (gk != nullptr) gkk = reinterpret_cast<const Pack<T>*>(gk)[q];
        for (int e = 0; e < kPack; ++e) {
          A xv = load_acc(&xk.v[e]), mv = load_acc(&mk.v[e]), vv = load_acc(&vk.v[e]);
          const A wv = update(xv, mv, vv, load_acc(&gp.v[e]),
                              gk != nullptr ? load_acc(&gkk.v[e]) : A(0));
          store_acc(&wk.v[e], wv);
          store_acc(&xk.v[e], xv);
          store_acc(&mk.v[e], mv);
          store_acc(&vk.v[e], vv);
        }
        reinterpret_cast<Pack<T>*>(w)[q] = wk;
        reinterpret_cast<Pack<T>*>(x)[q] = xk;
        reinterpret_cast<Pack<T>*>(m)[q] = mk;
        reinterpret_cast<Pack<T>*>(v)[q] = vk;
      }
      i = n_packs * kPack;
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) {
      A xv = load_acc(x + i), mv = load_acc(m + i), vv = load_acc(v + i);
      const A wv = update(xv, mv, vv, load_acc(g + i), gk != nullptr ? load_acc(gk + i) : A(0));
      store_acc(w + i, wv);
      store_acc(x + i, xv);
      store_acc(m + i, mv);
      store_acc(v + i, vv);
    }
  }
};

}  // namespace lbkernels::cuda
