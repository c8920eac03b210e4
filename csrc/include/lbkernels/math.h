// Per-element math shared by the CPU and CUDA kernels (docs/algorithms.md section 1).
//
// Every function is templated on the value type so that the CPU kernels instantiate it
// with at::vec::Vectorized<float|double> and with scalars, and the CUDA kernels with
// float/double: one definition of the arithmetic, in one operation order, everywhere.
// The Triton kernels repeat it in Python and the tests keep all of them equal.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LBK_HD __host__ __device__ __forceinline__
#else
#define LBK_HD inline
#endif

namespace lbkernels {

// How a LARS step scales one tensor's direction: d = (g + wd * w) * r.
template <typename T>
struct LarsScale {
  T r;   // trust ratio (1 for excluded tensors)
  T wd;  // weight decay actually applied (0 under apex's zero-norm rule)
};

// Trust ratio of one tensor from its norms (n_g of the unscaled gradient).
// Same order of operations as the reference (and timm/apex): the ratio, then the
// zero-norm rule, then LARC clipping.
template <typename T>
LBK_HD LarsScale<T> lars_scale(T n_w, T n_g, T lr, T wd, T tc, T eps, bool clip,
                               bool zero_norm_decay, bool excluded) {
  if (excluded) return {T(1), wd};
  const bool valid = n_w > T(0) && n_g > T(0);
  T r = valid ? tc * n_w / (n_g + n_w * wd + eps) : T(1);
  if (clip) {
    r = r / lr;
    r = r < T(1) ? r : T(1);
  }
  if (!valid && !zero_norm_decay) return {T(1), T(0)};
  return {r, wd};
}

// Constants of one momentum-SGD update of one tensor, broadcast to the value type V.
template <typename V>
struct SgdCoefs {
  V scale;      // AMP grad scale the gradient is divided by (when has_scale)
  V wd;         // weight decay added to the gradient
  V r;          // per-tensor scale of the direction (LARS trust ratio, 1 for SGD)
  V pre;        // extra factor on d: lr for momentum_style="paper", else 1
  V m;          // momentum
  V damp;       // 1 - dampening (1 on the first step)
  V lr;         // step size applied to u: lr, or 1 for momentum_style="paper"
};

// d = ((g / scale) + wd * w) * r * pre
// buf = first ? d : m * buf + damp * d;   u = nesterov ? d + m * buf : buf;   w -= lr * u
template <typename V>
LBK_HD void sgd_update(V& w, V& buf, V g, const SgdCoefs<V>& c, bool has_scale,
                       bool has_momentum, bool nesterov, bool first) {
  if (has_scale) g = g / c.scale;
  V d = (g + c.wd * w) * c.r * c.pre;
  V u = d;
  if (has_momentum) {
    buf = first ? d : c.m * buf + c.damp * d;
    u = nesterov ? d + c.m * buf : buf;
  }
  w = w - c.lr * u;
}

// One weight-averaging update (docs/algorithms.md section 4): avg + r * (w - avg), with
// r = 1 / (n + 1) for the running mean (SWA) and r = 1 - decay for the EMA. V is the
// averages' type (fp32, or fp64 for fp64 params); w is already converted to it.
template <typename V>
LBK_HD V average_update(V avg, V w, V r) {
  return avg + r * (w - avg);
}

// The cross-worker mean written back after the all-reduce (docs/algorithms.md section 4):
// sum / k, a true division (not a multiplication by 1 / k, which differs in the last bit
// for k = 3), in the arithmetic type (fp32, or fp64 for fp64 params).
template <typename V>
LBK_HD V worker_mean(V sum, V k) {
  return sum / k;
}

}  // namespace lbkernels
