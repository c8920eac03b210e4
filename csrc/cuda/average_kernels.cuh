// CUDA functors of average_ (docs/algorithms.md section 4) and worker_mean_ (w = sum / k, the
// write-back of the cross-worker mean): avg += r * (w - avg), one block
// per 65,536-element chunk, with r = 1 / (n + 1) (SWA, n read on the device) or
// 1 - decay (EMA). The count is incremented by a one-thread kernel queued after every
// update launch of the call, so each block reads the count of before the call. The
// AMP found_inf flag is read on the device: when set, neither averages nor count change.
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cstdint>

#include <lbkernels/math.h>

#include "common.cuh"

namespace lbkernels::cuda {

// Weight averaging folded into an optimizer's write pass (lars_sgd_, lamb_: the last
// list holds the averages, opmath_t<T>): avg = average_update(avg, w as stored, r) with
// r = 1 / (n + 1) (SWA, n read on the device before the call's count update) or
// 1 - decay (EMA).
struct FoldedAverage {
  const int64_t* count;  // read when swa
  double one_minus_decay;
  bool swa;

  // r in the averages' type A; an IEEE division (the reference's 1 / (n + 1) in A).
  template <typename A>
  __device__ __forceinline__ A rate() const {
    return swa ? A(1) / (static_cast<A>(*count) + A(1)) : static_cast<A>(one_minus_decay);
  }
};

// addresses[0]: the average (opmath_t<T>: fp32, or fp64 for fp64 params);
// addresses[1]: the param (T).
template <typename T>
struct AverageUpdate {
  using A = opmath_t<T>;
  const int64_t* count;  // read when swa
  double one_minus_decay;
  DeviceScalar found_inf;
  bool swa;

  __device__ __forceinline__ void operator()(const TensorListMeta<2>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    // IEEE division (the reference's 1 / (n + 1) in the averages' dtype).
    const A r = swa ? A(1) / (static_cast<A>(*count) + A(1)) : static_cast<A>(one_minus_decay);
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    A* avg = static_cast<A*>(meta.addresses[0][slot]) + begin;
    const T* w = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      avg[i] = average_update<A>(avg[i], static_cast<A>(load_acc(w + i)), r);
  }
};

// worker_mean_: addresses[0] the param (T, written), addresses[1] its segment of the
// all-reduced flat sum (T). w = sum / k in opmath_t<T>, rounded once to T.
template <typename T>
struct WorkerMean {
  using A = opmath_t<T>;
  double k;  // the world size

  __device__ __forceinline__ void operator()(const TensorListMeta<2>& meta, int slot,
                                             int64_t chunk) const {
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    const T* sum = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    // k is exact in A (a world size below 2^24); the division is the IEEE one (nvcc's
    // default -prec-div=true, and torch's build does not pass --use_fast_math).
    const A kv = static_cast<A>(k);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      store_acc(w + i, worker_mean<A>(load_acc(sum + i), kv));
  }
};

// count += 1 unless found_inf is set; launched <<<1, 1>>> after the updates. A template
// (C = int64_t) so that the header can define it in every translation unit.
template <typename C>
__global__ void average_count_kernel(C* count, DeviceScalar found_inf) {
  if (!found_inf.nonzero()) *count += 1;
}

}  // namespace lbkernels::cuda
