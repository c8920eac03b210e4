// CUDA kernels of average_ and worker_mean_ (docs/algorithms.md sections 4 and 6): the
// argument checks of lbkernels/average_args.h, one launch per param dtype over all of
// its tensors (average_kernels.cuh), then the count update. Nothing is read back to the
// host unless count or found_inf live on the CPU, so an update never synchronises and
// can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/average_args.h>

#include <optional>
#include <vector>

#include "average_kernels.cuh"
#include "host_args.cuh"

namespace lbkernels::cuda {
namespace {

void average_cuda(at::TensorList averages, at::TensorList params,
                  const std::optional<at::Tensor>& count, c10::string_view method, double decay,
                  const std::optional<at::Tensor>& found_inf) {
  check_average_args(averages, params, count, method, found_inf, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const ScalarArg inf_arg(found_inf, dev);
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

// One launch (more only when the argument struct fills up) over every param. A param
// that is not contiguous (its memory order differs from the flat buffer's row-major
// order) is written through a contiguous temporary, copied back in stream order.
void worker_mean_cuda(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  check_worker_mean_args(params, flat_sum, world_size, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(flat_sum.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<TensorArgs<2>> tensors;
  Staging staging;
  const char* sum = static_cast<const char*>(flat_sum.const_data_ptr());
  const int64_t elem = flat_sum.element_size();
  int64_t offset = 0, total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor w = staging.output(params[i]);
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
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("average_", &average_op<average_cuda>);
  m.impl("worker_mean_", &worker_mean_op<worker_mean_cuda>);
}

}  // namespace lbkernels::cuda
