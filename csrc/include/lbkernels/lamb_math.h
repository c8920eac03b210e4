// Per-element math of lamb_ (docs/algorithms.md section 7), shared by the CPU and CUDA
// kernels like math.h: V is a scalar (float/double) or, on the CPU,
// at::vec::Vectorized<float|double>. The operation order is the reference's
// (lbkernels/reference/lamb.py), per style: timm's Lamb or apex's FusedLAMB kernel.
//
// A kernel runs the element twice: once for the norms of w and u (lamb_moments then
// lamb_direction, nothing written), once to write (the same calls on the same inputs,
// then lamb_write), so both passes see the same u bit for bit. A kernel whose pass 1
// stores the moments exactly (fp32/fp64) may instead run lamb_direction alone on them
// in pass 2: the same u again. (The CPU kernels run lamb_kernel.cpp's direction in both
// passes: this rule multiplying by 1 / bc1 and 1 / bc2, ~1 ulp of u from it.)
#pragma once

#include <cmath>
#include <cstdint>

#include <lbkernels/extrap_math.h>

namespace lbkernels {

// Per-tensor constants of one LAMB update, broadcast to V (each rounded once to the
// arithmetic type, as the reference holds it).
template <typename V>
struct LambCoefs {
  V scale;  // AMP grad scale the gradient is divided by (when has_scale)
  V clip;   // c of the global clipping, N / max_grad_norm or 1 (when has_clip)
  V wd;     // weight decay: L2 on g, or decoupled on u
  V b1;     // beta1
  V b3;     // weight of g in m: 1 - b1 (grad_averaging) or 1; timm: the lerp weight
  V b3c;    // 1 - b3, torch's lerp for weights >= 0.5
  V b2;     // beta2
  V w2;     // 1 - beta2
  V bc1;    // 1 - beta1^t (1 without bias correction)
  V bc2;    // timm: sqrt(1 - beta2^t); apex: 1 - beta2^t (1 without bias correction)
  V eps;
};

struct LambFlags {
  bool has_scale, has_clip;
  bool l2;         // g += wd * w (not decoupled; timm only when wd != 0)
  bool decoupled;  // u += wd * w (decoupled; timm only when wd != 0)
  bool apex;       // apex's order (denominator, write); else timm's
  bool lerp;       // timm with grad_averaging: m = lerp(m, g, b3)
  bool lerp_low;   // b3 < 0.5: torch's lerp computes m + b3 * (g - m), else g - (g - m) * b3c
};

// The op's scalar options as every kernel reads them (filled once by the host,
// lbkernels/lamb_args.h lamb_options).
struct LambOptions {
  double beta1, beta2, eps, weight_decay, lr, max_trust;
  bool bias_correction, grad_averaging, decoupled, has_max_trust, clip, apex, has_scale,
      has_clip;
};

template <typename C>
LBK_HD LambFlags lamb_flags(const LambOptions& o, const LambCoefs<C>& c) {
  // timm adds the decay only when wd != 0; apex always (0 * w when wd == 0).
  const bool decay = o.apex || o.weight_decay != 0.0;
  return {o.has_scale, o.has_clip, !o.decoupled && decay, o.decoupled && decay, o.apex,
          !o.apex && o.grad_averaging, c.b3 < C(0.5)};
}

// The constants of one tensor in its arithmetic type C (float, or double for fp64
// params), from its new step count t, the AMP scale and the clipping divisor. Bias
// corrections are computed in double from t, as the reference computes them from the
// counter (timm from a Python float); apex's style first rounds beta1, beta2 to C (its
// float arguments) and b3 = 1 - b1, w2 = 1 - b2 are computed in C.
template <typename C>
LBK_HD LambCoefs<C> lamb_coefs(const LambOptions& o, double t, C scale, C clip) {
  LambCoefs<C> c;
  c.scale = scale;
  c.clip = clip;
  c.wd = C(o.weight_decay);
  c.b1 = C(o.beta1);
  c.b2 = C(o.beta2);
  c.eps = C(o.eps);
  const double base1 = o.apex ? double(c.b1) : o.beta1;
  const double base2 = o.apex ? double(c.b2) : o.beta2;
  if (o.apex) {
    c.b3 = o.grad_averaging ? C(1) - c.b1 : C(1);
    c.w2 = C(1) - c.b2;
  } else {
    c.b3 = o.grad_averaging ? C(1.0 - o.beta1) : C(1);
    c.w2 = C(1.0 - o.beta2);
  }
  c.b3c = C(1) - c.b3;
  c.bc1 = o.bias_correction ? C(1.0 - pow(base1, t)) : C(1);
  if (!o.bias_correction) {
    c.bc2 = C(1);
  } else if (o.apex) {
    c.bc2 = C(1.0 - pow(base2, t));
  } else {
    c.bc2 = C(sqrt(1.0 - pow(base2, t)));
  }
  return c;
}

// The divisor c of the global clipping from N, the norm of the unscaled gradients.
LBK_HD double lamb_clip_divisor(double n, double max_grad_norm) {
  return n > max_grad_norm ? n / max_grad_norm : 1.0;
}

// The new moments of one element from its gradient (still AMP-scaled) and weight.
template <typename V>
LBK_HD void lamb_moments(V& m, V& v, V g, V w, const LambCoefs<V>& c, const LambFlags& f) {
  if (f.has_scale) g = g / c.scale;
  if (f.has_clip) g = g / c.clip;
  if (f.l2) g = g + c.wd * w;
  if (f.lerp) {
    m = f.lerp_low ? m + c.b3 * (g - m) : g - (g - m) * c.b3c;
  } else {
    m = m * c.b1 + c.b3 * g;
  }
  v = v * c.b2 + c.w2 * g * g;
}

// The direction u of one element from its new moments.
//   timm: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)      apex: (m / bc1) / (sqrt(v / bc2) + eps)
template <typename V>
LBK_HD V lamb_direction(V m, V v, V w, const LambCoefs<V>& c, const LambFlags& f) {
  const V denom = f.apex ? lbk_sqrt(v / c.bc2) + c.eps : lbk_sqrt(v) / c.bc2 + c.eps;
  V u = (m / c.bc1) / denom;
  if (f.decoupled) u = u + c.wd * w;
  return u;
}

// The new weight: timm w - lr * (r * u), apex w - (lr * r) * u.
template <typename V>
LBK_HD V lamb_write(V w, V u, V lr, V r, bool apex) {
  return apex ? w - (lr * r) * u : w - lr * (r * u);
}

// The trust ratio of one tensor from its norms: phi(||w||) / ||u||, phi(z) = min(z,
// max_trust) when has_max_trust; 1 when either norm is 0 or the tensor is excluded;
// min(r, 1) with clip (LAMBC). The reference's order: ratio, zero-norm rule, clipping.
template <typename T>
LBK_HD T lamb_ratio(T n_w, T n_u, bool has_max_trust, T max_trust, bool clip, bool excluded) {
  if (excluded) return T(1);
  const T phi = has_max_trust && n_w > max_trust ? max_trust : n_w;
  T r = n_w > T(0) && n_u > T(0) ? phi / n_u : T(1);
  if (clip) r = r < T(1) ? r : T(1);
  return r;
}

}  // namespace lbkernels
