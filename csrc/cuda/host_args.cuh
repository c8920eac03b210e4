// Host helpers of the CUDA ops: one-element tensor arguments handed to the kernels on the
// device, staging of layouts the kernels cannot walk, dispatch on the element type.
// Needs torch's headers (the kernels' headers must not include it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <utility>
#include <vector>

#include "lars_kernels.cuh"

namespace lbkernels::cuda {

// A one-element tensor argument read on the device. A CPU tensor is read on the host
// (no device sync); other dtypes are converted on the device (stream-ordered).
struct ScalarArg {
  DeviceScalar device;
  std::optional<double> host;
  at::Tensor keep;

  ScalarArg(const std::optional<at::Tensor>& t, const char* name, const c10::Device& dev) {
    if (!t.has_value()) return;
    TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold exactly one element, got shape ",
                      t->sizes());
    if (!t->is_cuda()) {
      host = t->item<double>();
      return;
    }
    keep = t->device() == dev ? *t : t->to(dev);
    switch (keep.scalar_type()) {
      case c10::kFloat: device.kind = ScalarKind::kFloat; break;
      case c10::kDouble: device.kind = ScalarKind::kDouble; break;
      case c10::kHalf: device.kind = ScalarKind::kHalf; break;
      case c10::kBFloat16: device.kind = ScalarKind::kBFloat16; break;
      default:
        keep = keep.to(c10::kDouble);
        device.kind = ScalarKind::kDouble;
    }
    device.ptr = keep.const_data_ptr();
  }

  // The value for the kernels: the device scalar, or a CPU value uploaded once (a
  // stream-ordered copy, no sync) for arguments the kernels only read on the device.
  DeviceScalar on_device(const at::TensorOptions& options) {
    if (!host.has_value() || device.ptr != nullptr) return device;
    keep = at::empty({1}, options.dtype(at::kDouble)).fill_(*host);
    device = {keep.const_data_ptr(), ScalarKind::kDouble};
    return device;
  }
};

// Views the kernels can walk: w dense (or contiguous), the other lists with w's strides;
// anything else goes through a temporary in w's layout (or contiguous) that write_back()
// copies to the original. Parameters and their state normally share strides: no copy.
class Staging {
 public:
  // contiguous: the kernel needs row-major element order (e.g. element-indexed random
  // numbers), not just a dense layout.
  at::Tensor lead(const at::Tensor& w, bool written, bool contiguous = false) {
    const bool walkable = contiguous ? w.is_contiguous() : w.is_non_overlapping_and_dense();
    return walkable ? w : stage(w, w.contiguous(), written);
  }
  at::Tensor follow(const at::Tensor& x, const at::Tensor& lead, bool written) {
    if (x.is_non_overlapping_and_dense() && x.strides() == lead.strides()) return x;
    return stage(x, at::empty_like(lead).copy_(x), written);
  }
  // follow() for an x whose dtype differs from lead's (the fp32 average of a 16-bit
  // param): a temporary in lead's layout but x's dtype.
  at::Tensor follow_as(const at::Tensor& x, const at::Tensor& lead, bool written) {
    if (x.is_non_overlapping_and_dense() && x.strides() == lead.strides()) return x;
    return stage(x, at::empty_like(lead, x.options()).copy_(x), written);
  }
  // Temporaries stay referenced here until the launches that read them are queued
  // (the caching allocator is stream-ordered, so freeing them afterwards is safe).
  void write_back() {
    for (auto& [orig, tmp] : pending_) orig.copy_(tmp);
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

// Calls f(T{}) with the kernels' element type of dtype t.
template <typename F>
void dispatch_float(c10::ScalarType t, const F& f) {
  switch (t) {
    case c10::kFloat: return f(float{});
    case c10::kDouble: return f(double{});
    case c10::kHalf: return f(__half{});
    case c10::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);  // rejected earlier
  }
}

// The arithmetic dtype of a storage dtype (fp64 for fp64, fp32 otherwise).
inline c10::ScalarType opmath_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

}  // namespace lbkernels::cuda
