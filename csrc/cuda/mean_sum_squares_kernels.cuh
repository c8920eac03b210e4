// CUDA functors of mean_sum_squares_ (docs/algorithms.md section 1.1): g = sum / k in
// place over a flat gradient bucket, each segment (one parameter's gradient) a "tensor"
// of the multi-tensor launcher, one block per 65,536-element chunk; every chunk's sum of
// squares of the stored g goes to partial[first_chunk + chunk] (in opmath_t<T>, summed in
// double over the block's threads' sums), then one block per segment adds its chunks'
// partials in a fixed order into out[segment]. Deterministic, no atomics.
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cstdint>

#include <lbkernels/math.h>

#include "common.cuh"

namespace lbkernels::cuda {

// addresses[0]: the segment of the flat buffer (T, divided in place).
template <typename T>
struct MeanSumSquares {
  using A = opmath_t<T>;
  double k;         // the world size (exact in A below 2^24)
  double* partial;  // one entry per chunk of the call

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t chunk) const {
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* x = static_cast<T*>(meta.addresses[0][slot]) + begin;
    const A kv = static_cast<A>(k);
    A s = A(0);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      // The IEEE division of worker_mean_, rounded once to T; the square of the stored
      // value, read back (the gradient the step will read).
      store_acc(x + i, worker_mean<A>(load_acc(x + i), kv));
      const A v = load_acc(x + i);
      s += v * v;
    }
    const double total = block_sum(static_cast<double>(s));
    if (threadIdx.x == 0) partial[meta.first_chunk[slot] + chunk] = total;
  }
};

// One block per segment (empty ones included): out[index] = the sum of its chunks' partials.
struct SegmentSums {
  const double* partial;
  double* out;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    const double s = tensor_sum(partial, meta.first_chunk[slot], num_chunks(meta.numel[slot]));
    if (threadIdx.x == 0) out[meta.index[slot]] = s;
  }
};

}  // namespace lbkernels::cuda
