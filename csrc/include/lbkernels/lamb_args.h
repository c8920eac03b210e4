// The arguments of lamb_ (docs/algorithms.md sections 7, 4 and 6), gathered and checked
// once for the CPU and CUDA hosts, in the order of check_lamb_args in
// lbkernels/reference/lamb.py and with its messages, every check before the first write.
// A host registers lamb_op<its_kernel, its device type>: the op's long signature is
// written here only, and the kernel receives the checked LambArgs.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include <lbkernels/average_args.h>
#include <lbkernels/host.h>
#include <lbkernels/lamb_math.h>

namespace lbkernels {

// What one call does (docs/algorithms.md section 7): the whole step, or one of its two
// stages around the sum of the norms over the shards of sharded tensors.
enum class LambStage { kFull, kMoments, kUpdate };

struct LambArgs {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps;
  c10::List<bool> exclude;
  double lr;
  std::optional<at::Tensor> lr_tensor;
  double beta1, beta2, eps, weight_decay;
  bool bias_correction, grad_averaging, decoupled_weight_decay;
  std::optional<double> max_trust;
  bool clip;
  std::optional<double> max_grad_norm;
  std::optional<at::Tensor> grad_norm;  // the norm of the scaled gradients, or none
  c10::string_view style;
  std::optional<at::Tensor> grad_scale, found_inf;
  at::TensorList averages;  // empty: no folded averaging
  std::optional<at::Tensor> average_count;
  c10::string_view average_method;
  double average_decay;
  std::optional<at::Tensor> norm_sq;  // (2, n): written by kMoments, read by kUpdate
  c10::string_view stage_name;

  bool apex() const { return style == "apex"; }
  LambStage stage() const {
    return stage_name == "moments" ? LambStage::kMoments
           : stage_name == "update" ? LambStage::kUpdate : LambStage::kFull;
  }
};

// The scalar options the kernels read; lr is the float argument (a host whose lr is a
// tensor reads it itself), has_clip whether the gradients are clipped. The update stage
// does not read the gradients: neither scale nor clip.
inline LambOptions lamb_options(const LambArgs& a, double lr) {
  const bool reads_g = a.stage() != LambStage::kUpdate;
  return {a.beta1, a.beta2, a.eps, a.weight_decay, lr, a.max_trust.value_or(0.0),
          a.bias_correction, a.grad_averaging, a.decoupled_weight_decay,
          a.max_trust.has_value(), a.clip, a.apex(), reads_g && a.grad_scale.has_value(),
          reads_g && a.max_grad_norm.has_value() && !a.params.empty()};
}

inline void check_lamb_args(const LambArgs& a, c10::DeviceType device_type) {
  check_list(a.params, "params", device_type);
  check_aligned(a.params, a.grads, "grads");
  check_aligned(a.params, a.exp_avgs, "exp_avgs");
  check_aligned(a.params, a.exp_avg_sqs, "exp_avg_sqs");
  check_count(a.exclude.size(), a.params, "exclude");
  check_count(a.steps.size(), a.params, "steps");
  check_steps(a.params, a.steps, 0.0);
  check_nonnegative("lr", a.lr);
  check_nonnegative("eps", a.eps);
  check_nonnegative("weight_decay", a.weight_decay);
  TORCH_CHECK_VALUE(a.beta1 >= 0.0 && a.beta1 < 1.0, "beta1 must be in [0, 1), got ", a.beta1);
  TORCH_CHECK_VALUE(a.beta2 >= 0.0 && a.beta2 < 1.0, "beta2 must be in [0, 1), got ", a.beta2);
  // `> 0` also rejects NaN.
  TORCH_CHECK_VALUE(!a.max_trust.has_value() || *a.max_trust > 0.0,
                    "max_trust must be > 0 or None, got ", a.max_trust.value_or(0.0));
  TORCH_CHECK_VALUE(!a.max_grad_norm.has_value() || *a.max_grad_norm > 0.0,
                    "max_grad_norm must be > 0 or None, got ", a.max_grad_norm.value_or(0.0));
  TORCH_CHECK_VALUE(!a.grad_norm.has_value() || a.max_grad_norm.has_value(),
                    "grad_norm is given but max_grad_norm is None: nothing to clip");
  TORCH_CHECK_VALUE(a.style == "timm" || a.style == "apex",
                    "style must be one of ('timm', 'apex'), got '", a.style, "'");
  check_scalar_tensor(a.lr_tensor, "lr_tensor");
  check_scalar_tensor(a.grad_norm, "grad_norm");
  check_scalar_tensor(a.grad_scale, "grad_scale");
  check_scalar_tensor(a.found_inf, "found_inf");
  check_folded_average(a.params, a.averages, a.average_count, a.average_method, a.found_inf,
                       device_type);
  TORCH_CHECK_VALUE(a.stage_name == "full" || a.stage_name == "moments" ||
                        a.stage_name == "update",
                    "stage must be one of ('full', 'moments', 'update'), got '", a.stage_name,
                    "'");
  TORCH_CHECK_VALUE(a.stage_name != "full" || !a.norm_sq.has_value(),
                    "norm_sq is given but stage is 'full': only the stages 'moments' (which "
                    "writes it) and 'update' (which reads it) take it");
  TORCH_CHECK_VALUE(a.stage_name == "full" || a.norm_sq.has_value(), "stage '", a.stage_name,
                    "' needs norm_sq, a (2, len(params)) float32/float64 tensor of the sums of "
                    "squares of w and u");
  check_norm_sq(a.params, a.norm_sq);
}

// The registered kernel of one device type: gathers and checks the arguments, then runs
// Kernel on them.
template <void (*Kernel)(const LambArgs&), c10::DeviceType kDevice>
void lamb_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
             at::TensorList exp_avg_sqs, at::TensorList steps, const c10::List<bool>& exclude,
             double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
             double eps, double weight_decay, bool bias_correction, bool grad_averaging,
             bool decoupled_weight_decay, std::optional<double> max_trust, bool clip,
             std::optional<double> max_grad_norm, const std::optional<at::Tensor>& grad_norm,
             c10::string_view style, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, std::optional<at::TensorList> averages,
             const std::optional<at::Tensor>& average_count, c10::string_view average_method,
             double average_decay, const std::optional<at::Tensor>& norm_sq,
             c10::string_view stage) {
  const LambArgs a{params, grads, exp_avgs, exp_avg_sqs, steps, exclude, lr, lr_tensor, beta1,
                   beta2, eps, weight_decay, bias_correction, grad_averaging,
                   decoupled_weight_decay, max_trust, clip, max_grad_norm, grad_norm, style,
                   grad_scale, found_inf, averages.value_or(at::TensorList()), average_count,
                   average_method, average_decay, norm_sq, stage};
  check_lamb_args(a, kDevice);
  Kernel(a);
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(steps);
  bump_versions(a.averages);
  bump_version(average_count);
  bump_version(norm_sq);
}

}  // namespace lbkernels
