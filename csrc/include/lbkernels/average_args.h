// The arguments of average_ and worker_mean_ (docs/algorithms.md section 4), checked once
// for the CPU and CUDA hosts: the same checks, in the same order and with the same
// messages, as check_average_args / check_worker_mean_args in
// lbkernels/reference/average.py, every one before the first write.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include <lbkernels/host.h>

namespace lbkernels {

// `averages` of `params` (one per param, in opmath_dtype of the param's dtype), with the
// count and method of the update. count_name / method_name are the arguments' names in
// the caller's schema (average_count / average_method when folded into lars_sgd_).
inline void check_average_args(at::TensorList averages, at::TensorList params,
                               const std::optional<at::Tensor>& count, c10::string_view method,
                               const std::optional<at::Tensor>& found_inf,
                               c10::DeviceType device_type, const char* count_name = "count",
                               const char* method_name = "method") {
  TORCH_CHECK_VALUE(method == "swa" || method == "ema", method_name,
                    " must be one of ('swa', 'ema'), got '", method, "'");
  TORCH_CHECK_VALUE(averages.size() == params.size(), "averages has ", averages.size(),
                    " entries but params has ", params.size());
  check_list(params, "params", device_type);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& a = averages[i];
    const at::Tensor& p = params[i];
    const c10::ScalarType want = opmath_dtype(p.scalar_type());
    TORCH_CHECK_TYPE(a.layout() == c10::kStrided, "params[", i, "] and averages[", i,
                     "] must be dense tensors");
    TORCH_CHECK_VALUE(a.device() == p.device(), "averages[", i, "] is on ", a.device(),
                      " but params[0] is on ", p.device());
    TORCH_CHECK_TYPE(a.scalar_type() == want, "averages[", i, "] has dtype ", a.scalar_type(),
                     " but params[", i, "] (", p.scalar_type(), ") is averaged in ", want);
    TORCH_CHECK_VALUE(a.sizes() == p.sizes(), "averages[", i, "] has shape ", a.sizes(),
                      " but params[", i, "] has ", p.sizes());
  }
  if (!count.has_value()) {
    TORCH_CHECK_VALUE(method != "swa", method_name, "='swa' needs ", count_name,
                      " (a one-element int64 tensor)");
  } else {
    TORCH_CHECK_TYPE(count->numel() == 1 && count->scalar_type() == at::kLong, count_name,
                     " must be a one-element int64 tensor, got ", count->scalar_type(),
                     " of shape ", count->sizes());
    TORCH_CHECK_VALUE(params.empty() || count->device() == params[0].device(), count_name,
                      " is on ", count->device(), " but params[0] is on ", params[0].device());
  }
  check_scalar_tensor(found_inf, "found_inf");
}

// The weight averaging folded into lars_sgd_ (check_folded_average_args in
// lbkernels/reference/lars.py), after the step's own checks.
inline void check_folded_average(at::TensorList params, at::TensorList averages,
                                 const std::optional<at::Tensor>& count, c10::string_view method,
                                 const std::optional<at::Tensor>& found_inf,
                                 c10::DeviceType device_type) {
  if (!averages.empty())
    return check_average_args(averages, params, count, method, found_inf, device_type,
                              "average_count", "average_method");
  TORCH_CHECK_VALUE(method == "swa" || method == "ema",
                    "average_method must be one of ('swa', 'ema'), got '", method, "'");
  TORCH_CHECK_VALUE(!count.has_value(),
                    "average_count is given but averages is empty: nothing to average");
}

inline void check_worker_mean_args(at::TensorList params, const at::Tensor& flat_sum,
                                   int64_t world_size, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size must be an integer >= 1, got ", world_size);
  TORCH_CHECK_TYPE(flat_sum.layout() == c10::kStrided && flat_sum.dim() == 1 &&
                       flat_sum.is_contiguous(),
                   "flat_sum must be a contiguous 1-D tensor, got shape ", flat_sum.sizes(),
                   " and strides ", flat_sum.strides());
  TORCH_CHECK_TYPE(supported_dtype(flat_sum.scalar_type()), "flat_sum has dtype ",
                   flat_sum.scalar_type(), "; expected a floating dtype");
  TORCH_CHECK_VALUE(flat_sum.device().type() == device_type, "flat_sum is on ",
                    flat_sum.device(), " but this is the ", c10::DeviceTypeName(device_type),
                    " kernel");
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(p.layout() == c10::kStrided, "params[", i, "] has layout ", p.layout(),
                     "; expected a dense tensor");
    TORCH_CHECK_TYPE(p.scalar_type() == flat_sum.scalar_type(), "params[", i, "] has dtype ",
                     p.scalar_type(), " but flat_sum has ", flat_sum.scalar_type(),
                     " (pack one flat buffer per dtype)");
    TORCH_CHECK_VALUE(p.device() == flat_sum.device(), "params[", i, "] is on ", p.device(),
                      " but flat_sum is on ", flat_sum.device());
    total += p.numel();
  }
  TORCH_CHECK_VALUE(flat_sum.numel() == total, "flat_sum has ", flat_sum.numel(),
                    " elements but the params have ", total);
}

// The registered kernels of average_ and worker_mean_ on one device type: the host's
// kernel (which checks its arguments), then the version bumps.
template <void (*Kernel)(at::TensorList, at::TensorList, const std::optional<at::Tensor>&,
                         c10::string_view, double, const std::optional<at::Tensor>&)>
void average_op(at::TensorList averages, at::TensorList params,
                const std::optional<at::Tensor>& count, c10::string_view method, double decay,
                const std::optional<at::Tensor>& found_inf) {
  Kernel(averages, params, count, method, decay, found_inf);
  bump_versions(averages);
  bump_version(count);
}

template <void (*Kernel)(at::TensorList, const at::Tensor&, int64_t)>
void worker_mean_op(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  Kernel(params, flat_sum, world_size);
  bump_versions(params);
}

}  // namespace lbkernels
