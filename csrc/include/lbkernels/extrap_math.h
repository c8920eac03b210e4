// Per-element math of extrap_sgd_ and extrap_adam_ (docs/algorithms.md sections 2, 2.1, 2.2),
// shared by the CPU and CUDA kernels like math.h. V is a scalar (float/double) or, on the
// CPU, at::vec::Vectorized<float|double>. The anchor update of extrap_sgd_ is math.h's
// sgd_update (first = false: buffers start at zero, so m * 0 + d is already the first
// step); these functions add the extrapolated point and the Adam update.
#pragma once

#include <cmath>
#include <cstdint>

#include <lbkernels/math.h>

namespace lbkernels {

// The extrapolation variants of extrap_sgd_ (docs/algorithms.md section 2.1), in the
// order of the op's `extrapolation` names ("past_grad", "gaussian", "uniform", "weight",
// "filter"); parsed once by the host (lbkernels/extrap_args.h), read by every kernel.
enum class Extrapolation : int32_t { kPastGrad, kGaussian, kUniform, kWeight, kFilter };

// sqrt / abs for scalars and for vector types that have .sqrt() / .abs().
LBK_HD float lbk_sqrt(float x) { return sqrtf(x); }
LBK_HD double lbk_sqrt(double x) { return sqrt(x); }
template <typename V>
LBK_HD V lbk_sqrt(const V& x) { return x.sqrt(); }
LBK_HD float lbk_abs(float x) { return fabsf(x); }
LBK_HD double lbk_abs(double x) { return fabs(x); }
template <typename V>
LBK_HD V lbk_abs(const V& x) { return x.abs(); }

// The extrapolated point from the (unscaled) local gradient: w = x - extrap_lr * gk.
template <typename V>
LBK_HD V extrap_point(V x, V gk, V extrap_lr) {
  return x - extrap_lr * gk;
}

// The noise variants: w = x + a * z ("gaussian", "uniform"; "filter" with a the
// per-filter factor a * ||x_j|| / (||r_j|| + 1e-6)) and w = x + a * z * |x| ("weight").
template <typename V>
LBK_HD V noise_point(V x, V z, V a) {
  return x + a * z;
}
template <typename V>
LBK_HD V weight_noise_point(V x, V z, V a) {
  return x + a * z * lbk_abs(x);
}

// Constants of one extrap-Adam update of one tensor, broadcast to V.
template <typename V>
struct AdamCoefs {
  V scale;      // AMP grad scale (when has_scale)
  V wd;         // L2 weight decay added to the gradient (when !decoupled)
  V decay;      // 1 - lr * wd, the decoupled (AdamW) shrink of the anchor
  V w1;         // 1 - beta1, the lerp weight of the first moment
  V w1c;        // 1 - w1 (torch's lerp for weights >= 0.5)
  V beta2;
  V w2;         // 1 - beta2
  V step_size;  // lr / (1 - beta1^t)
  V bc2_sqrt;   // sqrt(1 - beta2^t)
  V eps;
  V extrap_lr;
};

struct AdamFlags {
  bool has_scale, has_local, has_wd, decoupled;
  bool lerp_low;  // w1 < 0.5: torch's lerp computes m + w1 * (g - m), else g - (g - m) * w1c
};

// torch.optim.Adam (amsgrad=False) on the anchor x, in its operation order, then the
// extrapolated point w = x - extrap_lr * gk / denom with the same denom.
template <typename V>
LBK_HD void extrap_adam_update(V& x, V& m, V& v, V& w, V g, V gk, const AdamCoefs<V>& c,
                               const AdamFlags& f) {
  if (f.has_scale) {
    g = g / c.scale;
    gk = f.has_local ? gk / c.scale : g;
  } else if (!f.has_local) {
    gk = g;
  }
  if (f.has_wd) {
    if (f.decoupled) {
      x = x * c.decay;
    } else {
      g = g + c.wd * x;
    }
  }
  m = f.lerp_low ? m + c.w1 * (g - m) : g - (g - m) * c.w1c;
  v = v * c.beta2 + c.w2 * g * g;
  const V denom = lbk_sqrt(v) / c.bc2_sqrt + c.eps;
  x = x - c.step_size * (m / denom);
  w = x - c.extrap_lr * (gk / denom);
}

}  // namespace lbkernels
