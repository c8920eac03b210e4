// The arguments of mean_sum_squares_ (docs/algorithms.md section 1.1), checked once for
// the CPU and CUDA hosts: the same checks, in the same order and with the same messages,
// as check_mean_sum_squares_args in lbkernels/reference/mean_sum_squares.py, every one
// before the first write. Also the version bump every host makes after its kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <lbkernels/host.h>

namespace lbkernels {

inline void check_mean_sum_squares_args(const at::Tensor& flat, c10::IntArrayRef sizes,
                                        int64_t world_size, const at::Tensor& out,
                                        c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size must be an integer >= 1, got ", world_size);
  TORCH_CHECK_TYPE(flat.layout() == c10::kStrided && flat.dim() == 1 && flat.is_contiguous(),
                   "flat must be a contiguous 1-D tensor, got shape ", flat.sizes(),
                   " and strides ", flat.strides());
  TORCH_CHECK_TYPE(supported_dtype(flat.scalar_type()), "flat has dtype ", flat.scalar_type(),
                   "; expected a floating dtype");
  TORCH_CHECK_VALUE(flat.device().type() == device_type, "flat is on ", flat.device(),
                    " but this is the ", c10::DeviceTypeName(device_type), " kernel");
  int64_t total = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    TORCH_CHECK_VALUE(sizes[j] >= 0, "sizes[", j, "] is ", sizes[j], "; expected >= 0");
    total += sizes[j];
  }
  TORCH_CHECK_VALUE(total == flat.numel(), "sizes add up to ", total, " but flat has ",
                    flat.numel(), " elements");
  TORCH_CHECK_TYPE(out.layout() == c10::kStrided && out.dim() == 1 && out.is_contiguous(),
                   "out must be a contiguous 1-D tensor, got shape ", out.sizes(),
                   " and strides ", out.strides());
  TORCH_CHECK_TYPE(out.scalar_type() == c10::kDouble, "out must be float64, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.numel() == static_cast<int64_t>(sizes.size()), "out has ", out.numel(),
                    " elements but sizes has ", sizes.size());
  TORCH_CHECK_VALUE(out.device() == flat.device(), "out is on ", out.device(),
                    " but flat is on ", flat.device());
}

// The registered kernel of one device type: Kernel (which checks its arguments), then
// the version bumps of what it wrote, so that a reader that recorded the old versions
// (lbkernels.distributed.grad_norms) sees the write.
template <void (*Kernel)(const at::Tensor&, at::IntArrayRef, int64_t, const at::Tensor&)>
void mean_sum_squares_op(const at::Tensor& flat, at::IntArrayRef sizes, int64_t world_size,
                         const at::Tensor& out) {
  Kernel(flat, sizes, world_size, out);
  bump_version(flat);
  bump_version(out);
}

}  // namespace lbkernels
