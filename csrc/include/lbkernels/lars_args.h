// The arguments of lars_sgd_ (docs/algorithms.md sections 1, 4 and 6), gathered and
// checked once for the CPU and CUDA hosts, in the order of lbkernels/reference/lars.py
// and with its messages, every check before the first write. A host registers
// lars_sgd_op<its_kernel, its device type>: the op's long signature is written here
// only, and the kernel receives the checked LarsSgdArgs.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include <lbkernels/average_args.h>
#include <lbkernels/host.h>

namespace lbkernels {

struct LarsSgdArgs {
  at::TensorList params, grads, momentum_buffers, steps;
  c10::List<bool> exclude;
  double lr;
  std::optional<at::Tensor> lr_tensor;
  double momentum, dampening, weight_decay;
  bool nesterov;
  double trust_coefficient, eps;
  bool clip, zero_norm_decay;
  c10::string_view momentum_style;
  std::optional<at::Tensor> grad_scale, found_inf;
  at::TensorList averages;  // empty: no folded averaging
  std::optional<at::Tensor> average_count;
  c10::string_view average_method;
  double average_decay;
  std::optional<at::Tensor> norm_sq;  // (2, n) squared norms of w and g; < 0: not given
  // The norm cache (both or neither): ||w_i||^2 of the w this op wrote last (float64, (n,),
  // params' device) and its key (int64, (2, n), CPU): (version counter, data_ptr) of w_i
  // after that op. An entry whose key matches the param is its ||w||^2, not summed again.
  std::optional<at::Tensor> w_norm_sq, w_norm_key;

  bool has_momentum() const { return momentum != 0.0; }
  bool paper() const { return momentum_style == "paper"; }
};

inline void check_lars_sgd_args(const LarsSgdArgs& a, c10::DeviceType device_type) {
  check_list(a.params, "params", device_type);
  check_aligned(a.params, a.grads, "grads");
  if (a.has_momentum()) {
    check_aligned(a.params, a.momentum_buffers, "momentum_buffers");
    check_steps(a.params, a.steps, a.dampening);
  }
  check_count(a.exclude.size(), a.params, "exclude");
  TORCH_CHECK_VALUE(a.momentum_style == "torch" || a.momentum_style == "paper",
                    "momentum_style must be 'torch' or 'paper', got '", a.momentum_style, "'");
  check_scalar_tensor(a.lr_tensor, "lr_tensor");
  check_scalar_tensor(a.grad_scale, "grad_scale");
  check_scalar_tensor(a.found_inf, "found_inf");
  check_folded_average(a.params, a.averages, a.average_count, a.average_method, a.found_inf,
                       device_type);
  check_norm_sq(a.params, a.norm_sq);
}

// The registered kernel of one device type: gathers and checks the arguments, then runs
// Kernel on them.
template <void (*Kernel)(const LarsSgdArgs&), c10::DeviceType kDevice>
void lars_sgd_op(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::TensorList steps, const c10::List<bool>& exclude, double lr,
                 const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                 double weight_decay, bool nesterov, double trust_coefficient, double eps,
                 bool clip, bool zero_norm_decay, c10::string_view momentum_style,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 std::optional<at::TensorList> averages,
                 const std::optional<at::Tensor>& average_count,
                 c10::string_view average_method, double average_decay,
                 const std::optional<at::Tensor>& norm_sq,
                 const std::optional<at::Tensor>& w_norm_sq,
                 const std::optional<at::Tensor>& w_norm_key) {
  const LarsSgdArgs a{params, grads, momentum_buffers, steps, exclude, lr, lr_tensor, momentum,
                      dampening, weight_decay, nesterov, trust_coefficient, eps, clip,
                      zero_norm_decay, momentum_style, grad_scale, found_inf,
                      averages.value_or(at::TensorList()), average_count, average_method,
                      average_decay, norm_sq, w_norm_sq, w_norm_key};
  check_lars_sgd_args(a, kDevice);
  Kernel(a);
}

}  // namespace lbkernels
