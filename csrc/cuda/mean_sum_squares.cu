// CUDA kernel of mean_sum_squares_ (docs/algorithms.md section 1.1): the argument checks
// of lbkernels/mean_sum_squares_args.h, one launch (more only when the argument struct
// fills up) that divides every chunk of the flat buffer and sums its squares, one that
// adds each segment's partials (mean_sum_squares_kernels.cuh). Nothing is read back to
// the host: the bucket may still be the output of an all-reduce queued on the stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/mean_sum_squares_args.h>

#include <vector>

#include "host_args.cuh"
#include "mean_sum_squares_kernels.cuh"

namespace lbkernels::cuda {
namespace {

void mean_sum_squares_cuda(const at::Tensor& flat, at::IntArrayRef sizes, int64_t world_size,
                           const at::Tensor& out) {
  check_mean_sum_squares_args(flat, sizes, world_size, out, c10::DeviceType::CUDA);
  if (sizes.empty()) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<TensorArgs<1>> segments;
  char* base = static_cast<char*>(flat.data_ptr());
  const int64_t elem = flat.element_size();
  int64_t offset = 0, total = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    segments.push_back({{base + offset * elem}, sizes[j], total, static_cast<int32_t>(j), 0});
    offset += sizes[j];
    total += num_chunks(sizes[j]);
  }
  const at::Tensor partial = at::empty({total}, flat.options().dtype(at::kDouble));
  double* p = partial.mutable_data_ptr<double>();
  dispatch_float(flat.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(multi_tensor_apply<1>(segments, Blocks::kPerChunk, kChunkThreads, stream,
                                         MeanSumSquares<T>{static_cast<double>(world_size), p}));
  });
  C10_CUDA_CHECK(multi_tensor_apply<1>(segments, Blocks::kPerTensor, kChunkThreads, stream,
                                       SegmentSums{p, out.mutable_data_ptr<double>()}));
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("mean_sum_squares_", &mean_sum_squares_op<mean_sum_squares_cuda>);
}

}  // namespace lbkernels::cuda
