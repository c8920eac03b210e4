// Host helpers of the CUDA ops: one-element tensor arguments handed to the kernels on the
// device and dispatch on the element type (the checks and the staging of layouts the
// kernels cannot walk are lbkernels/host.h, shared with the CPU host).
// Needs torch's headers (the kernels' headers must not include it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include <lbkernels/host.h>

#include "common.cuh"

namespace lbkernels::cuda {

// A one-element tensor argument (its size checked by the op's argument checks) read on
// the device. A CPU tensor is read on the host (no device sync); other dtypes are
// converted on the device (stream-ordered).
struct ScalarArg {
  DeviceScalar device;
  std::optional<double> host;
  at::Tensor keep;

  ScalarArg(const std::optional<at::Tensor>& t, const c10::Device& dev) {
    if (!t.has_value()) return;
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

// The one-element tensor arguments of an optimizer step, as its kernels read them.
struct StepScalars {
  ScalarArg lr, extrap_lr, grad_scale, found_inf;
  DeviceScalar scale;  // grad_scale, uploaded once when given as a CPU tensor

  StepScalars(const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& extrap_lr_tensor,
              const std::optional<at::Tensor>& grad_scale_tensor,
              const std::optional<at::Tensor>& found_inf_tensor, const at::Tensor& param)
      : lr(lr_tensor, param.device()),
        extrap_lr(extrap_lr_tensor, param.device()),
        grad_scale(grad_scale_tensor, param.device()),
        found_inf(found_inf_tensor, param.device()),
        scale(grad_scale.on_device(param.options())) {}

  // A CPU found_inf is read on the host: a set flag skips the whole call.
  bool skip() const { return found_inf.host.has_value() && *found_inf.host != 0.0; }
};

// The op's norm_sq (checked by check_norm_sq: on the params' device, (2, n), contiguous)
// as the norm passes read it on the device; none: every norm is computed.
inline GivenNorms given_norms(const std::optional<at::Tensor>& norm_sq) {
  if (!norm_sq.has_value()) return {};
  return {norm_sq->const_data_ptr(), norm_sq->scalar_type() == c10::kDouble, norm_sq->size(1)};
}

// Per-tensor scratch on the device, by argument index: one S (a struct of doubles) per
// param, written and read by the kernels only; `keep` holds it until the launches are
// queued.
template <typename S>
S* per_tensor_scratch(at::Tensor& keep, at::TensorList params) {
  static_assert(sizeof(S) % sizeof(double) == 0, "S must be made of doubles");
  const auto n = static_cast<int64_t>(params.size() * (sizeof(S) / sizeof(double)));
  keep = at::empty({n}, params[0].options().dtype(at::kDouble));
  return reinterpret_cast<S*>(keep.mutable_data_ptr<double>());
}

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

}  // namespace lbkernels::cuda
