// The arguments of extrap_sgd_ and extrap_adam_ (docs/algorithms.md sections 2, 2.1,
// 2.2), gathered, parsed and checked once for the CPU and CUDA hosts, in the order of
// lbkernels/reference/extrap.py and with its messages, every check before the first
// write. A host registers extrap_sgd_op / extrap_adam_op<its_kernel, its device type>:
// the ops' long signatures are written here only.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include <lbkernels/extrap_math.h>
#include <lbkernels/host.h>

namespace lbkernels {

// What both ops share: the lists of the extrapolated step and its one-element tensors.
struct ExtrapCommonArgs {
  at::TensorList params, anchors, grads, local_grads;  // local_grads empty: gk = g
  double lr;
  std::optional<at::Tensor> lr_tensor;
  double extrap_lr;
  std::optional<at::Tensor> extrap_lr_tensor, grad_scale, found_inf;
};

struct ExtrapSgdArgs : ExtrapCommonArgs {
  at::TensorList momentum_buffers;
  c10::List<bool> exclude;
  double momentum, weight_decay;
  bool nesterov, lars;
  double trust_coefficient, eps;
  bool clip;
  Extrapolation mode;  // parsed from the op's `extrapolation` name
  double noise_scale;
  int64_t seed, offset;
  std::optional<at::Tensor> norm_sq;  // (2, n) squared norms of x and g; < 0: not given

  bool has_momentum() const { return momentum != 0.0; }
};

struct ExtrapAdamArgs : ExtrapCommonArgs {
  at::TensorList exp_avgs, exp_avg_sqs, steps;
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;
};

inline Extrapolation parse_extrapolation(c10::string_view s) {
  if (s == "past_grad") return Extrapolation::kPastGrad;
  if (s == "gaussian") return Extrapolation::kGaussian;
  if (s == "uniform") return Extrapolation::kUniform;
  if (s == "weight") return Extrapolation::kWeight;
  TORCH_CHECK_VALUE(s == "filter",
                    "extrapolation must be one of ('past_grad', 'gaussian', 'uniform', "
                    "'weight', 'filter'), got '", s, "'");
  return Extrapolation::kFilter;
}

inline void check_extrap_common_args(const ExtrapCommonArgs& a, c10::DeviceType device_type) {
  check_list(a.params, "params", device_type);
  check_aligned(a.params, a.anchors, "anchors");
  check_aligned(a.params, a.grads, "grads");
  check_optional_aligned(a.params, a.local_grads, "local_grads");
  check_scalar_tensor(a.lr_tensor, "lr_tensor");
  check_scalar_tensor(a.extrap_lr_tensor, "extrap_lr_tensor");
  check_scalar_tensor(a.grad_scale, "grad_scale");
  check_scalar_tensor(a.found_inf, "found_inf");
}

template <void (*Kernel)(const ExtrapSgdArgs&), c10::DeviceType kDevice>
void extrap_sgd_op(at::TensorList params, at::TensorList anchors,
                   at::TensorList momentum_buffers, at::TensorList grads,
                   at::TensorList local_grads, const c10::List<bool>& exclude, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                   const std::optional<at::Tensor>& extrap_lr_tensor, double momentum,
                   double weight_decay, bool nesterov, bool lars, double trust_coefficient,
                   double eps, bool clip, c10::string_view extrapolation, double noise_scale,
                   int64_t seed, int64_t offset, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& norm_sq) {
  ExtrapSgdArgs a{{params, anchors, grads, local_grads, lr, lr_tensor, extrap_lr,
                   extrap_lr_tensor, grad_scale, found_inf},
                  momentum_buffers, exclude, momentum, weight_decay, nesterov, lars,
                  trust_coefficient, eps, clip, Extrapolation::kPastGrad, noise_scale, seed,
                  offset, norm_sq};
  check_extrap_common_args(a, kDevice);
  check_count(a.exclude.size(), params, "exclude");
  if (a.has_momentum()) check_aligned(params, momentum_buffers, "momentum_buffers");
  a.mode = parse_extrapolation(extrapolation);
  check_nonnegative("lr", lr);
  check_nonnegative("extrap_lr", extrap_lr);
  check_nonnegative("momentum", momentum);
  check_nonnegative("weight_decay", weight_decay);
  check_nonnegative("noise_scale", noise_scale);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  check_norm_sq(params, norm_sq);
  Kernel(a);
  bump_versions(params);
  bump_versions(anchors);
  bump_versions(momentum_buffers);
}

template <void (*Kernel)(const ExtrapAdamArgs&), c10::DeviceType kDevice>
void extrap_adam_op(at::TensorList params, at::TensorList anchors, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList grads,
                    at::TensorList local_grads, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                    const std::optional<at::Tensor>& extrap_lr_tensor, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const ExtrapAdamArgs a{{params, anchors, grads, local_grads, lr, lr_tensor, extrap_lr,
                          extrap_lr_tensor, grad_scale, found_inf},
                         exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, weight_decay,
                         decoupled_weight_decay};
  check_extrap_common_args(a, kDevice);
  check_aligned(params, exp_avgs, "exp_avgs");
  check_aligned(params, exp_avg_sqs, "exp_avg_sqs");
  check_count(steps.size(), params, "steps");
  check_steps(params, steps, 0.0);
  check_nonnegative("lr", lr);
  check_nonnegative("extrap_lr", extrap_lr);
  check_nonnegative("eps", eps);
  check_nonnegative("weight_decay", weight_decay);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  Kernel(a);
  bump_versions(params);
  bump_versions(anchors);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(steps);
}

}  // namespace lbkernels
