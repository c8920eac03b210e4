// Compile-only check of the CUDA kernels (csrc/cuda/check.sh): every kernel the
// extension launches, instantiated for every dtype it accepts, so that code which
// cannot run on a machine without a GPU still cannot rot. Not part of the extension.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../average_kernels.cuh"
#include "../common.cuh"
#include "../extrap_adam_kernels.cuh"
#include "../extrap_kernels.cuh"
#include "../lamb_kernels.cuh"
#include "../lars_kernels.cuh"
#include "../mean_sum_squares_kernels.cuh"

namespace lbkernels::cuda {

// The kernel and the launcher of one functor over DEPTH lists (the functor's name may
// hold commas, hence the variadic argument).
#define LBK_KERNEL(DEPTH, ...)                                                                \
  template __global__ void multi_tensor_kernel<DEPTH, __VA_ARGS__>(TensorListMeta<DEPTH>,     \
                                                                   __VA_ARGS__);              \
  template cudaError_t multi_tensor_apply<DEPTH, __VA_ARGS__>(                                \
      const std::vector<TensorArgs<DEPTH>>&, Blocks, int, cudaStream_t, const __VA_ARGS__&);

// Per element type: the norms and LARS passes (common.cuh, lars_kernels.cuh), average_
// and worker_mean_, extrap_sgd_ (update, filter sums, filter factors, filter write) and
// extrap_adam_, and lamb_ (moments, ratio, update without and with the averaging).
#define LBK_INSTANTIATE(T)                                                                    \
  LBK_KERNEL(1, SumSquares<T, 1>)                                                             \
  LBK_KERNEL(2, SumSquares<T, 2>)                                                             \
  LBK_KERNEL(1, LarsCoefs<T>)                                                                 \
  LBK_KERNEL(1, Norms<T>)                                                                     \
  LBK_KERNEL(3, LarsUpdate<T>)                                                                \
  LBK_KERNEL(4, LarsUpdate<T, 4>)                                                             \
  LBK_KERNEL(1, StoreWNormSq<T>)                                                              \
  LBK_KERNEL(2, AverageUpdate<T>)                                                             \
  LBK_KERNEL(2, WorkerMean<T>)                                                                \
  LBK_KERNEL(1, MeanSumSquares<T>)                                                            \
  LBK_KERNEL(5, ExtrapSgdUpdate<T>)                                                           \
  LBK_KERNEL(1, FilterSums<T>)                                                                \
  LBK_KERNEL(1, FilterFactors<T>)                                                             \
  LBK_KERNEL(2, FilterWrite<T>)                                                               \
  LBK_KERNEL(6, ExtrapAdamUpdate<T>)                                                          \
  LBK_KERNEL(5, LambMoments<T>)                                                               \
  LBK_KERNEL(1, LambRatio<T>)                                                                 \
  LBK_KERNEL(4, LambUpdate<T>)                                                                \
  LBK_KERNEL(5, LambUpdate<T, 5>)

LBK_INSTANTIATE(float)
LBK_INSTANTIATE(double)
LBK_INSTANTIATE(__half)
LBK_INSTANTIATE(__nv_bfloat16)

// The segment sums of mean_sum_squares_ (independent of the bucket's dtype).
LBK_KERNEL(1, SegmentSums)

// The step counters of extrap_adam_ (independent of the param dtype).
LBK_KERNEL(1, AdamBiasPass)

template __global__ void average_count_kernel<int64_t>(int64_t*, DeviceScalar);

// The global gradient norm of lamb_: per group sums in the arithmetic type, the
// clipping divisor in fp32 or fp64.
template __global__ void lamb_group_sum<float>(const float*, int64_t, double*);
template __global__ void lamb_group_sum<double>(const double*, int64_t, double*);
template __global__ void lamb_clip_kernel<float>(const double*, int, DeviceScalar, DeviceScalar,
                                                 double, double*);
template __global__ void lamb_clip_kernel<double>(const double*, int, DeviceScalar, DeviceScalar,
                                                  double, double*);

#undef LBK_INSTANTIATE
#undef LBK_KERNEL

}  // namespace lbkernels::cuda
