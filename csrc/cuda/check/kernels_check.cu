// Compile-only check of the CUDA kernels (csrc/cuda/check.sh): every kernel the
// extension launches, instantiated for every dtype it accepts, so that code which
// cannot run on a machine without a GPU still cannot rot. Not part of the extension.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../average_kernels.cuh"
#include "../extrap_kernels.cuh"
#include "../lars_kernels.cuh"

namespace lbkernels::cuda {

#define LBK_INSTANTIATE(T)                                                   \
  template __global__ void multi_tensor_kernel<1, SumSquares<T, 1>>(       \
      TensorListMeta<1>, SumSquares<T, 1>);                                  \
  template __global__ void multi_tensor_kernel<2, SumSquares<T, 2>>(       \
      TensorListMeta<2>, SumSquares<T, 2>);                                  \
  template __global__ void multi_tensor_kernel<1, Norms<T>>(TensorListMeta<1>, Norms<T>); \
  template __global__ void multi_tensor_kernel<1, LarsCoefs<T>>(TensorListMeta<1>,        \
                                                                LarsCoefs<T>);            \
  template __global__ void multi_tensor_kernel<3, LarsUpdate<T>>(TensorListMeta<3>,       \
                                                                 LarsUpdate<T>);          \
  template cudaError_t multi_tensor_apply<1, SumSquares<T, 1>>(                           \
      const std::vector<TensorArgs<1>>&, Blocks, int, cudaStream_t, const SumSquares<T, 1>&); \
  template cudaError_t multi_tensor_apply<2, SumSquares<T, 2>>(                           \
      const std::vector<TensorArgs<2>>&, Blocks, int, cudaStream_t, const SumSquares<T, 2>&); \
  template cudaError_t multi_tensor_apply<1, Norms<T>>(                                   \
      const std::vector<TensorArgs<1>>&, Blocks, int, cudaStream_t, const Norms<T>&);     \
  template cudaError_t multi_tensor_apply<1, LarsCoefs<T>>(                               \
      const std::vector<TensorArgs<1>>&, Blocks, int, cudaStream_t, const LarsCoefs<T>&); \
  template cudaError_t multi_tensor_apply<3, LarsUpdate<T>>(                              \
      const std::vector<TensorArgs<3>>&, Blocks, int, cudaStream_t, const LarsUpdate<T>&); \
  template __global__ void multi_tensor_kernel<4, LarsUpdate<T, 4>>(TensorListMeta<4>,    \
                                                                    LarsUpdate<T, 4>);    \
  template cudaError_t multi_tensor_apply<4, LarsUpdate<T, 4>>(                           \
      const std::vector<TensorArgs<4>>&, Blocks, int, cudaStream_t, const LarsUpdate<T, 4>&); \
  template __global__ void multi_tensor_kernel<2, AverageUpdate<T>>(TensorListMeta<2>,    \
                                                                    AverageUpdate<T>);    \
  template cudaError_t multi_tensor_apply<2, AverageUpdate<T>>(                           \
      const std::vector<TensorArgs<2>>&, Blocks, int, cudaStream_t, const AverageUpdate<T>&); \
  template __global__ void multi_tensor_kernel<2, WorkerMean<T>>(TensorListMeta<2>,        \
                                                                 WorkerMean<T>);          \
  template cudaError_t multi_tensor_apply<2, WorkerMean<T>>(                              \
      const std::vector<TensorArgs<2>>&, Blocks, int, cudaStream_t, const WorkerMean<T>&);

LBK_INSTANTIATE(float)
LBK_INSTANTIATE(double)
LBK_INSTANTIATE(__half)
LBK_INSTANTIATE(__nv_bfloat16)

// extrap_sgd_ (update, filter sums, filter factors, filter write) and extrap_adam_.
#define LBK_INSTANTIATE_EXTRAP(T)                                                              \
  template __global__ void multi_tensor_kernel<5, ExtrapSgdUpdate<T>>(TensorListMeta<5>,       \
                                                                      ExtrapSgdUpdate<T>);     \
  template __global__ void multi_tensor_kernel<1, FilterSums<T>>(TensorListMeta<1>,            \
                                                                 FilterSums<T>);               \
  template __global__ void multi_tensor_kernel<1, FilterFactors<T>>(TensorListMeta<1>,         \
                                                                    FilterFactors<T>);         \
  template __global__ void multi_tensor_kernel<2, FilterWrite<T>>(TensorListMeta<2>,           \
                                                                  FilterWrite<T>);             \
  template __global__ void multi_tensor_kernel<6, ExtrapAdamUpdate<T>>(TensorListMeta<6>,      \
                                                                       ExtrapAdamUpdate<T>);   \
  template cudaError_t multi_tensor_apply<5, ExtrapSgdUpdate<T>>(                              \
      const std::vector<TensorArgs<5>>&, Blocks, int, cudaStream_t, const ExtrapSgdUpdate<T>&); \
  template cudaError_t multi_tensor_apply<1, FilterSums<T>>(                                   \
      const std::vector<TensorArgs<1>>&, Blocks, int, cudaStream_t, const FilterSums<T>&);     \
  template cudaError_t multi_tensor_apply<1, FilterFactors<T>>(                                \
      const std::vector<TensorArgs<1>>&, Blocks, int, cudaStream_t, const FilterFactors<T>&);  \
  template cudaError_t multi_tensor_apply<2, FilterWrite<T>>(                                  \
      const std::vector<TensorArgs<2>>&, Blocks, int, cudaStream_t, const FilterWrite<T>&);    \
  template cudaError_t multi_tensor_apply<6, ExtrapAdamUpdate<T>>(                             \
      const std::vector<TensorArgs<6>>&, Blocks, int, cudaStream_t, const ExtrapAdamUpdate<T>&);

LBK_INSTANTIATE_EXTRAP(float)
LBK_INSTANTIATE_EXTRAP(double)
LBK_INSTANTIATE_EXTRAP(__half)
LBK_INSTANTIATE_EXTRAP(__nv_bfloat16)

// The step counters of extrap_adam_ (independent of the param dtype).
template __global__ void multi_tensor_kernel<1, AdamBiasPass>(TensorListMeta<1>, AdamBiasPass);
template cudaError_t multi_tensor_apply<1, AdamBiasPass>(const std::vector<TensorArgs<1>>&,
                                                         Blocks, int, cudaStream_t,
                                                         const AdamBiasPass&);

template __global__ void average_count_kernel<int64_t>(int64_t*, DeviceScalar);

#undef LBK_INSTANTIATE_EXTRAP
#undef LBK_INSTANTIATE

}  // namespace lbkernels::cuda
