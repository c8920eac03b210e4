// Host code shared by the CPU and CUDA multi-tensor ops, below the ops' own argument
// checks (lbkernels/{lars,average,extrap}_args.h): checks of tensor lists and scalars
// (the Python backends make the same checks with the same messages,
// lbkernels/_validate.py), the grouping of a call's tensors by dtype, and the staging of
// layouts the kernels cannot walk.
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError; all
// checks run before any tensor is written, so a rejected call changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

// The out argument of multi_tensor_l2norm.out: a contiguous float32 tensor of shape
// (len(xs),) on xs' device; the same checks and messages as the reference's
// check_l2norm_args (lbkernels/reference/lars.py), before anything is written.
inline void check_l2norm_out(at::TensorList xs, const at::Tensor& out) {
  TORCH_CHECK_TYPE(out.layout() == c10::kStrided && out.scalar_type() == c10::kFloat,
                   "out must be a dense float32 tensor, got ", out.scalar_type(), " ",
                   out.layout());
  const auto n = static_cast<int64_t>(xs.size());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == n, "out must have shape (len(xs),) = (",
                    n, ",), got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  if (!xs.empty())
    TORCH_CHECK_VALUE(out.device() == xs[0].device(), "out is on ", out.device(),
                      " but xs[0] is on ", xs[0].device());
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

// `xs` empty, or aligned with `params` (local gradients, for instance).
inline void check_optional_aligned(at::TensorList params, at::TensorList xs, const char* name) {
  TORCH_CHECK_VALUE(xs.empty() || xs.size() == params.size(), name, " has ", xs.size(),
                    " entries but params has ", params.size(), " (or pass none)");
  if (!xs.empty()) check_aligned(params, xs, name);
}

// A list of flags or counters with one entry per param.
inline void check_count(size_t size, at::TensorList params, const char* name) {
  TORCH_CHECK_VALUE(size == params.size(), name, " has ", size, " entries but params has ",
                    params.size());
}

inline void check_nonnegative(const char* name, double v) {
  TORCH_CHECK_VALUE(v >= 0.0, name, " must be >= 0, got ", v);  // also rejects NaN
}

// A one-element tensor argument (lr_tensor, grad_scale, found_inf, ...), when given.
inline void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* name) {
  if (t.has_value())
    TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold exactly one element, got shape ",
                      t->sizes());
}

// The precomputed squared norms of lars_sgd_ / extrap_sgd_ (norm_sq), when given: a
// contiguous float32/float64 tensor of shape (2, len(params)) on the params' device. Its
// values are not read here (on CUDA it may still be written by a collective in flight).
inline void check_norm_sq(at::TensorList params, const std::optional<at::Tensor>& norm_sq) {
  if (!norm_sq.has_value()) return;
  const at::Tensor& t = *norm_sq;
  TORCH_CHECK_TYPE(t.layout() == c10::kStrided, "norm_sq must be a dense tensor, got layout ",
                   t.layout());
  TORCH_CHECK_TYPE(t.scalar_type() == c10::kFloat || t.scalar_type() == c10::kDouble,
                   "norm_sq must be float32 or float64, got ", t.scalar_type());
  if (!params.empty())
    TORCH_CHECK_VALUE(t.device() == params[0].device(), "norm_sq is on ", t.device(),
                      " but params[0] is on ", params[0].device());
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == 2 && t.size(1) == n,
                    "norm_sq must have shape (2, len(params)) = (2, ", n, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "norm_sq must be contiguous");
}

// The arithmetic dtype of a storage dtype (fp64 for fp64, fp32 otherwise): the dtype of
// the averages of average_ and of the kernels' partial sums.
inline c10::ScalarType opmath_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
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

// Views the kernels can walk: a lead tensor dense (or contiguous), the others in the
// lead's strides; anything else goes through a temporary in the lead's layout (or
// contiguous) that write_back() copies to the original. Parameters and their state
// normally share strides: no copy.
class Staging {
 public:
  // contiguous: the kernel needs row-major element order (element-indexed random numbers,
  // a flat buffer's order), not just a dense layout.
  at::Tensor lead(const at::Tensor& w, bool written, bool contiguous = false) {
    const bool walkable = contiguous ? w.is_contiguous() : w.is_non_overlapping_and_dense();
    return walkable ? w : stage(w, w.contiguous(), written);
  }
  // lead() of a tensor that is only written (its old values are not read): a contiguous
  // temporary is not filled first.
  at::Tensor output(const at::Tensor& w) {
    return w.is_contiguous() ? w : stage(w, at::empty(w.sizes(), w.options()), true);
  }
  at::Tensor follow(const at::Tensor& x, const at::Tensor& lead, bool written) {
    if (walkable_with(x, lead)) return x;
    return stage(x, at::empty_like(lead).copy_(x), written);
  }
  // follow() for an x whose dtype differs from lead's (the fp32 average of a 16-bit
  // param): a temporary in lead's layout but x's dtype.
  at::Tensor follow_as(const at::Tensor& x, const at::Tensor& lead, bool written) {
    if (walkable_with(x, lead)) return x;
    return stage(x, at::empty_like(lead, x.options()).copy_(x), written);
  }
  // Temporaries stay referenced here until the loops (or launches) that read them are
  // done (queued, on CUDA: the caching allocator is stream-ordered, so freeing them
  // afterwards is safe).
  void write_back() {
    for (auto& [orig, tmp] : pending_) orig.copy_(tmp);
  }

  // Whether follow(x, lead) returns x itself (no temporary).
  static bool walkable_with(const at::Tensor& x, const at::Tensor& lead) {
    return x.is_non_overlapping_and_dense() && x.strides() == lead.strides();
  }

 private:
  at::Tensor stage(const at::Tensor& orig, at::Tensor tmp, bool written) {
    keep_.push_back(tmp);
    if (written) pending_.emplace_back(orig, tmp);
    return tmp;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
  std::vector<at::Tensor> keep_;
};

// Every op bumps the version counter of each tensor it mutates, once per call, after its
// kernel (also on a skipped step, as torch's fused optimizers), as torch's in-place ops
// do: autograd then sees the change, and so does lars_sgd_'s norm cache (w_norm_key).
// Inference tensors have no counter.
inline void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}
inline void bump_version(const std::optional<at::Tensor>& t) {
  if (t.has_value()) bump_version(*t);
}
inline void bump_versions(at::TensorList ts) {
  for (const at::Tensor& t : ts) bump_version(t);
}

}  // namespace lbkernels
