// CUDA kernel of average_ (ALGORITHMS.md sections 4 and 6): argument checks, one launch
// per param dtype over all of its tensors (average_kernels.cuh), then the count update.
// Nothing is read back to the host unless count or found_inf live on the CPU, so an
// update never synchronises and can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/host.h>

#include <optional>
#include <utility>
#include <vector>

#include "average_kernels.cuh"
#include "host_args.cuh"

namespace lbkernels::cuda {
namespace {

// Same checks and messages as lbkernels/reference/average.py.
void check_average_args(at::TensorList averages, at::TensorList params,
                        const std::optional<at::Tensor>& count, c10::string_view method,
                        const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK_VALUE(method == "swa" || method == "ema",
                    "method must be one of ('swa', 'ema'), got '", method, "'");
  TORCH_CHECK_VALUE(averages.size() == params.size(), "averages has ", averages.size(),
                    " entries but params has ", params.size());
  check_list(params, "params", c10::DeviceType::CUDA);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& a = averages[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(a.layout() == c10::kStrided, "params[", i, "] and averages[", i,
                     "] must be dense tensors");
    TORCH_CHECK_VALUE(a.device() == p.device(), "averages[", i, "] is on ", a.device(),
                      " but params[0] is on ", p.device());
    TORCH_CHECK_TYPE(a.scalar_type() == opmath_dtype(p.scalar_type()), "averages[", i,
                     "] has dtype ", a.scalar_type(), " but params[", i, "] (",
                     p.scalar_type(), ") is averaged in ", opmath_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(a.sizes() == p.sizes(), "averages[", i, "] has shape ", a.sizes(),
                      " but params[", i, "] has ", p.sizes());
  }
  if (!count.has_value()) {
    TORCH_CHECK_VALUE(method != "swa", "method='swa' needs count (a one-element int64 tensor)");
  } else {
    TORCH_CHECK_TYPE(count->numel() == 1 && count->scalar_type() == at::kLong,
                     "count must be a one-element int64 tensor, got ", count->scalar_type(),
                     " of shape ", count->sizes());
    TORCH_CHECK_VALUE(params.empty() || count->device() == params[0].device(), "count is on ",
                      count->device(), " but params[0] is on ", params[0].device());
  }
  if (found_inf.has_value())
    TORCH_CHECK_VALUE(found_inf->numel() == 1, "found_inf must hold exactly one element, got shape ",
                      found_inf->sizes());
}

void average_cuda(at::TensorList averages, at::TensorList params,
                  const std::optional<at::Tensor>& count, c10::string_view method, double decay,
                  const std::optional<at::Tensor>& found_inf) {
  check_average_args(averages, params, count, method, found_inf);
  if (params.empty()) return;
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const ScalarArg inf_arg(found_inf, "found_inf", dev);
  if (inf_arg.host.has_value() && *inf_arg.host != 0.0) return;  // a CPU flag: decided on the host
  const DeviceScalar inf = inf_arg.device;
  const bool swa = method == "swa";
  int64_t* count_ptr = count.has_value() ? count->mutable_data_ptr<int64_t>() : nullptr;

  Staging staging;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    std::vector<TensorArgs<2>> tensors;
    int64_t total = 0;
    for (const int64_t i : index) {
      // The average leads (the param may be 16-bit): the param follows in its dtype.
      const at::Tensor a = staging.lead(averages[i], true);
      const at::Tensor w = staging.follow_as(params[i], a, false);
      tensors.push_back({{a.data_ptr(), const_cast<void*>(w.const_data_ptr())}, a.numel(), total,
                         static_cast<int32_t>(i), 0});
      total += num_chunks(a.numel());
    }
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      C10_CUDA_CHECK(multi_tensor_apply<2>(tensors, Blocks::kPerChunk, kChunkThreads, stream,
                                           AverageUpdate<T>{count_ptr, 1.0 - decay, inf, swa}));
    });
  }
  staging.write_back();
  if (count_ptr != nullptr) {
    average_count_kernel<<<1, 1, 0, stream>>>(count_ptr, inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Same checks and messages as check_worker_mean_args in lbkernels/reference/average.py.
void check_worker_mean_args(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size must be an integer >= 1, got ", world_size);
  TORCH_CHECK_TYPE(flat_sum.layout() == c10::kStrided && flat_sum.dim() == 1 &&
                       flat_sum.is_contiguous(),
                   "flat_sum must be a contiguous 1-D tensor, got shape ", flat_sum.sizes(),
                   " and strides ", flat_sum.strides());
  TORCH_CHECK_TYPE(supported_dtype(flat_sum.scalar_type()), "flat_sum has dtype ",
                   flat_sum.scalar_type(), "; expected a floating dtype");
  TORCH_CHECK_VALUE(flat_sum.is_cuda(), "flat_sum is on ", flat_sum.device(),
                    " but this is the CUDA kernel");
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

// One launch (more only when the argument struct fills up) over every param. A param
// that is not contiguous (its memory order differs from the flat buffer's row-major
// order) is written through a contiguous temporary, copied back in stream order.
void worker_mean_cuda(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  check_worker_mean_args(params, flat_sum, world_size);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(flat_sum.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<TensorArgs<2>> tensors;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending;  // (param, temporary)
  const char* sum = static_cast<const char*>(flat_sum.const_data_ptr());
  const int64_t elem = flat_sum.element_size();
  int64_t offset = 0, total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor w = params[i];
    if (!w.is_contiguous()) {
      w = at::empty(w.sizes(), w.options());
      pending.emplace_back(params[i], w);
    }
    tensors.push_back({{w.data_ptr(), const_cast<char*>(sum + offset * elem)}, w.numel(), total,
                       static_cast<int32_t>(i), 0});
    offset += w.numel();
    total += num_chunks(w.numel());
  }
  dispatch_float(flat_sum.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(multi_tensor_apply<2>(tensors, Blocks::kPerChunk, kChunkThreads, stream,
                                         WorkerMean<T>{static_cast<double>(world_size)}));
  });
  for (auto& [orig, tmp] : pending) orig.copy_(tmp);
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("average_", &average_cuda);
  m.impl("worker_mean_", &worker_mean_cuda);
}

}  // namespace lbkernels::cuda
