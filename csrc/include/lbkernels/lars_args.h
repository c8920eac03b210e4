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

// The norm cache's two tensors (check_w_norm_cache in lbkernels/reference/lars.py): both
// or neither, w_norm_sq float64 (n,) on the params' device, w_norm_key int64 (2, n) on the
// CPU (read and written on the host), both contiguous.
inline void check_w_norm_cache(at::TensorList params, const std::optional<at::Tensor>& w_norm_sq,
                               const std::optional<at::Tensor>& w_norm_key) {
  TORCH_CHECK_VALUE(w_norm_sq.has_value() || !w_norm_key.has_value(),
                    "w_norm_sq is missing: w_norm_key is given (pass both or neither)");
  TORCH_CHECK_VALUE(w_norm_key.has_value() || !w_norm_sq.has_value(),
                    "w_norm_key is missing: w_norm_sq is given (pass both or neither)");
  if (!w_norm_sq.has_value()) return;
  const auto n = static_cast<int64_t>(params.size());
  const at::Tensor& s = *w_norm_sq;
  const at::Tensor& k = *w_norm_key;
  TORCH_CHECK_VALUE(s.layout() == c10::kStrided && s.scalar_type() == c10::kDouble,
                    "w_norm_sq must be a dense float64 tensor, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == n,
                    "w_norm_sq must have shape (len(params),) = (", n, ",), got ", s.sizes());
  if (!params.empty())
    TORCH_CHECK_VALUE(s.device() == params[0].device(), "w_norm_sq is on ", s.device(),
                      " but params[0] is on ", params[0].device());
  TORCH_CHECK_VALUE(s.is_contiguous(), "w_norm_sq must be contiguous");
  TORCH_CHECK_VALUE(k.layout() == c10::kStrided && k.scalar_type() == c10::kLong,
                    "w_norm_key must be a dense int64 tensor, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 2 && k.size(0) == 2 && k.size(1) == n,
                    "w_norm_key must have shape (2, len(params)) = (2, ", n, "), got ", k.sizes());
  TORCH_CHECK_VALUE(k.device().is_cpu(), "w_norm_key must be on the CPU, got ", k.device());
  TORCH_CHECK_VALUE(k.is_contiguous(), "w_norm_key must be contiguous");
}

// Whether params, grads and momentum_buffers pass check_list / check_aligned, in one pass
// that reads each param's metadata once (the three passes re-read it: 2000 params cost
// ~3x their TensorImpl cache misses). It only answers; the checks themselves, with their
// messages and in their order, run when it says no (and then throw).
inline bool lars_lists_ok(const LarsSgdArgs& a, c10::DeviceType device_type) {
  const size_t n = a.params.size();
  const bool bufs = a.has_momentum();
  if (a.grads.size() != n || (bufs && a.momentum_buffers.size() != n)) return false;
  if (n == 0) return true;
  const c10::Device device = a.params[0].device();
  if (device.type() != device_type) return false;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    const c10::ScalarType dtype = p.scalar_type();
    if (p.layout() != c10::kStrided || !supported_dtype(dtype) || p.device() != device)
      return false;
    const c10::IntArrayRef sizes = p.sizes();
    auto aligned = [&](const at::Tensor& x) {
      return x.layout() == c10::kStrided && x.device() == device && x.scalar_type() == dtype &&
             x.sizes() == sizes;
    };
    if (!aligned(a.grads[i]) || (bufs && !aligned(a.momentum_buffers[i]))) return false;
  }
  return true;
}

inline void check_lars_sgd_args(const LarsSgdArgs& a, c10::DeviceType device_type) {
  if (!lars_lists_ok(a, device_type)) {
    check_list(a.params, "params", device_type);
    check_aligned(a.params, a.grads, "grads");
    if (a.has_momentum()) check_aligned(a.params, a.momentum_buffers, "momentum_buffers");
  }
  if (a.has_momentum()) check_steps(a.params, a.steps, a.dampening);
  check_count(a.exclude.size(), a.params, "exclude");
  TORCH_CHECK_VALUE(a.momentum_style == "torch" || a.momentum_style == "paper",
                    "momentum_style must be 'torch' or 'paper', got '", a.momentum_style, "'");
  check_scalar_tensor(a.lr_tensor, "lr_tensor");
  check_scalar_tensor(a.grad_scale, "grad_scale");
  check_scalar_tensor(a.found_inf, "found_inf");
  check_folded_average(a.params, a.averages, a.average_count, a.average_method, a.found_inf,
                       device_type);
  check_norm_sq(a.params, a.norm_sq);
  check_w_norm_cache(a.params, a.w_norm_sq, a.w_norm_key);
}

// w_norm_key[0, i] while the op runs: "refreshed by this call, version to be written once
// every version bump is done" (a version counter is never negative, so it never matches).
constexpr int64_t kVersionPending = -1;

// Whether param i's key (version counter, address) matches w_norm_key; read on the host
// only (the entry itself may live on the device).
inline bool w_norm_key_matches(const LarsSgdArgs& a, int64_t i) {
  if (!a.w_norm_key.has_value()) return false;
  const at::Tensor& p = a.params[i];
  if (p.is_inference()) return false;  // no version counter: nothing can be trusted
  const int64_t n = static_cast<int64_t>(a.params.size());
  const int64_t* key = a.w_norm_key->const_data_ptr<int64_t>();
  return key[i] == static_cast<int64_t>(p._version()) &&
         key[n + i] == reinterpret_cast<int64_t>(p.const_data_ptr());
}

// The cached ||w_i||^2 (>= 0) when the key of param i matches it (same version counter
// and data_ptr as after the op that wrote it), else -1: the kernel sums it. CPU entries only.
inline double cached_w_norm_sq(const LarsSgdArgs& a, int64_t i) {
  if (!w_norm_key_matches(a, i)) return -1;
  const double v = a.w_norm_sq->const_data_ptr<double>()[i];
  return v >= 0 ? v : -1;
}

// Marks entry i as written by this call (its w_norm_sq entry holds the new ||w_i||^2):
// the op's wrapper writes its key once the versions are bumped. Kernels of a backend that
// fills no entries call nothing: their cache then never matches.
inline void mark_w_norm_written(const LarsSgdArgs& a, int64_t i) {
  if (a.params[i].is_inference()) return;  // no version counter: never a valid key
  const int64_t n = static_cast<int64_t>(a.params.size());
  int64_t* key = a.w_norm_key->mutable_data_ptr<int64_t>();
  key[i] = kVersionPending;
  key[n + i] = reinterpret_cast<int64_t>(a.params[i].const_data_ptr());
}

// The keys of the entries marked by the kernel: the version counters after the op.
inline void finish_w_norm_keys(const LarsSgdArgs& a) {
  if (!a.w_norm_key.has_value()) return;
  const int64_t n = static_cast<int64_t>(a.params.size());
  int64_t* key = a.w_norm_key->mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (key[i] == kVersionPending) key[i] = static_cast<int64_t>(a.params[i]._version());
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
  bump_versions(params);
  bump_versions(momentum_buffers);
  bump_versions(steps);
  bump_versions(a.averages);
  bump_version(average_count);
  bump_version(w_norm_sq);
  bump_version(w_norm_key);
  finish_w_norm_keys(a);  // after the bumps: the key holds the version after the op
}

}  // namespace lbkernels
