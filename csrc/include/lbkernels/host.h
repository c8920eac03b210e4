// Host code shared by the CPU and CUDA multi-tensor ops: argument checks (the Python
// backends make the same checks with the same messages, lbkernels/_validate.py) and the
// grouping of a call's tensors by dtype.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError; all
// checks run before any tensor is written, so a rejected call changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <vector>

namespace lbkernels {

inline bool supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

// Every tensor of `xs` dense, floating, on one device of type `device_type`.
inline void check_list(at::TensorList xs, const char* name, c10::DeviceType device_type) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK_TYPE(x.layout() == c10::kStrided, name, "[", i, "] must be a dense tensor");
    TORCH_CHECK_TYPE(supported_dtype(x.scalar_type()), name, "[", i, "] has dtype ",
                     x.scalar_type(), "; expected a floating dtype");
    TORCH_CHECK_VALUE(x.device() == xs[0].device(), name, "[", i, "] is on ", x.device(),
                      " but ", name, "[0] is on ", xs[0].device());
    TORCH_CHECK_VALUE(x.device().type() == device_type, name, "[", i, "] is on ", x.device(),
                      " but this is the ", c10::DeviceTypeName(device_type), " kernel");
  }
}

// `xs` aligned with `params`: same length, and per element the same device, dtype, shape.
inline void check_aligned(at::TensorList params, at::TensorList xs, const char* name) {
  TORCH_CHECK_VALUE(xs.size() == params.size(), name, " has ", xs.size(),
                    " entries but params has ", params.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(x.layout() == c10::kStrided, name, "[", i,
                     "] must be dense; sparse tensors are not supported");
    TORCH_CHECK_VALUE(x.device() == p.device(), name, "[", i, "] is on ", x.device(),
                      " but params[", i, "] is on ", p.device());
    TORCH_CHECK_TYPE(x.scalar_type() == p.scalar_type(), name, "[", i, "] has dtype ",
                     x.scalar_type(), " but params[", i, "] has ", p.scalar_type());
    TORCH_CHECK_VALUE(x.sizes() == p.sizes(), name, "[", i, "] has shape ", x.sizes(),
                      " but params[", i, "] has ", p.sizes());
  }
}

// Step counters: one per param, except that without dampening none are needed
// (buffers start at zero, so m * 0 + d is already the first step).
inline void check_steps(at::TensorList params, at::TensorList steps, double dampening) {
  TORCH_CHECK_VALUE(steps.size() == params.size() || (steps.empty() && dampening == 0.0),
                    "steps has ", steps.size(), " entries but params has ", params.size(),
                    " (dampening != 0 needs a step counter per param)");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_TYPE(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat,
                     "steps[", i, "] must be a one-element float32 tensor");
    TORCH_CHECK_VALUE(steps[i].device() == params[i].device(), "steps[", i, "] is on ",
                      steps[i].device(), " but params[", i, "] is on ", params[i].device());
  }
}

inline void check_momentum_style(c10::string_view momentum_style) {
  TORCH_CHECK_VALUE(momentum_style == "torch" || momentum_style == "paper",
                    "momentum_style must be 'torch' or 'paper', got '", momentum_style, "'");
}

// The checks of the weight averaging folded into lars_sgd_ (same order and messages as
// check_folded_average_args in lbkernels/reference/lars.py, after the step's own checks).
inline void check_folded_average(at::TensorList params, at::TensorList averages,
                                 const std::optional<at::Tensor>& count, c10::string_view method) {
  TORCH_CHECK_VALUE(method == "swa" || method == "ema",
                    "average_method must be one of ('swa', 'ema'), got '", method, "'");
  if (averages.empty()) {
    TORCH_CHECK_VALUE(!count.has_value(),
                      "average_count is given but averages is empty: nothing to average");
    return;
  }
  TORCH_CHECK_VALUE(averages.size() == params.size(), "averages has ", averages.size(),
                    " entries but params has ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& a = averages[i];
    const at::Tensor& p = params[i];
    const c10::ScalarType want = p.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
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
    TORCH_CHECK_VALUE(method != "swa",
                      "average_method='swa' needs average_count (a one-element int64 tensor)");
  } else {
    TORCH_CHECK_TYPE(count->numel() == 1 && count->scalar_type() == at::kLong,
                     "average_count must be a one-element int64 tensor, got ",
                     count->scalar_type(), " of shape ", count->sizes());
    TORCH_CHECK_VALUE(params.empty() || count->device() == params[0].device(),
                      "average_count is on ", count->device(), " but params[0] is on ",
                      params[0].device());
  }
}

// Indices of `xs` grouped by dtype, in order: one sweep (or launch) per dtype.
inline std::vector<std::pair<c10::ScalarType, std::vector<int64_t>>> group_by_dtype(
    at::TensorList xs) {
  std::vector<std::pair<c10::ScalarType, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < xs.size(); ++i) {
    auto it = groups.begin();
    while (it != groups.end() && it->first != xs[i].scalar_type()) ++it;
    if (it == groups.end()) it = groups.insert(groups.end(), {xs[i].scalar_type(), {}});
    it->second.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

}  // namespace lbkernels
