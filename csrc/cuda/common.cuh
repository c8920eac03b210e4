// Device helpers shared by the CUDA functors of every op (docs/algorithms.md section 6):
// element loads and stores in the arithmetic type, device scalars, aligned packs,
// deterministic block sums, and the per-tensor norm and trust-ratio passes that
// multi_tensor_l2norm, lars_sgd_ and extrap_sgd_ (with lars) all run:
//   1. SumSquares (a block per chunk): sums of squares of w and of the unscaled g per
//      chunk, into a partials buffer (fp32 sums, fp64 for fp64 tensors);
//   2. LarsCoefs (a block per tensor): the tensor's partials added in a fixed order
//      (deterministic, no atomics), its norms, the trust ratio from lars_scale(), the
//      first-step flag and the step count.
// A norm given by the op's norm_sq (GivenNorms, read on the device) is not summed by pass
// 1 (that list is not read for the tensor) and pass 2 takes its square root instead; so
// is lars_sgd_'s cached ||w||^2 (w_cache, where the tensor's flag has kFlagCachedKey).
// Each thread of a chunk pass takes the same elements whatever the lists' alignment
// (kPack consecutive ones at a time, then the tail): the sum of a list does not depend on
// which other lists are read with it, so lars_sgd_'s update can sum the new w in the
// order this pass would sum it at the next call.
// An op's own functors live in its header (lars_kernels.cuh, extrap_kernels.cuh, ...),
// which includes this one and no other op's.
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <lbkernels/math.h>

#include "multi_tensor_apply.cuh"

namespace lbkernels::cuda {

// Threads per block. Chunk passes: 512 threads x 4-element packs, 32 iterations per
// 64K chunk; per-tensor passes sum a few partials, 256 threads is plenty.
constexpr int kChunkThreads = 512;
constexpr int kTensorThreads = 256;
constexpr int kPack = 4;

// ---------------------------------------------------------------------------- types

template <typename T>
struct OpMath { using type = float; };
template <>
struct OpMath<double> { using type = double; };
template <typename T>
using opmath_t = typename OpMath<T>::type;

// Element loads and stores in the arithmetic type (fp32 for 16-bit dtypes).
__device__ __forceinline__ float load_acc(const float* p) { return *p; }
__device__ __forceinline__ double load_acc(const double* p) { return *p; }
__device__ __forceinline__ float load_acc(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// IEEE square root whatever the compiler's fast-math flags: the norms must match the
// reference's torch.linalg.vector_norm.
__device__ __forceinline__ float sqrt_rn(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return __dsqrt_rn(x); }

// A one-element tensor read on the device (lr, grad_scale, found_inf), in any float dtype.
enum class ScalarKind : int32_t { kNone, kFloat, kDouble, kHalf, kBFloat16 };

struct DeviceScalar {
  const void* ptr = nullptr;
  ScalarKind kind = ScalarKind::kNone;

  __device__ __forceinline__ double load() const {
    switch (kind) {
      case ScalarKind::kFloat: return *static_cast<const float*>(ptr);
      case ScalarKind::kDouble: return *static_cast<const double*>(ptr);
      case ScalarKind::kHalf: return __half2float(*static_cast<const __half*>(ptr));
      case ScalarKind::kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(ptr));
      default: return 0.0;
    }
  }
  // The value in the arithmetic type A, rounded once (as the reference's .to(dtype)).
  template <typename A>
  __device__ __forceinline__ A get() const { return static_cast<A>(load()); }
  __device__ __forceinline__ bool set() const { return ptr != nullptr; }
  // found_inf semantics: a missing flag is "no inf found".
  __device__ __forceinline__ bool nonzero() const { return ptr != nullptr && load() != 0.0; }
};

// The op's norm_sq read on the device (lars_sgd_, extrap_sgd_): row 0 the squared norm of
// the trust ratio's w, row 1 that of the still-scaled g, by argument index; an entry < 0
// (or NaN, or no tensor) is "not given". Read by the norm passes only, never on the host:
// it may be the output of an all-reduce still in flight on the stream.
struct GivenNorms {
  const void* ptr = nullptr;
  bool fp64 = false;
  int64_t n = 0;  // len(params): the row length

  __device__ __forceinline__ double load(int row, int32_t index) const {
    if (ptr == nullptr) return -1.0;
    const int64_t k = row * n + index;
    return fp64 ? static_cast<const double*>(ptr)[k]
                : static_cast<double>(static_cast<const float*>(ptr)[k]);
  }
};

// ------------------------------------------------------------------------- helpers

template <typename T>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// Pack p of x (elements kPack * p ...): one vector access where x is pack-aligned,
// kPack scalar ones where not; the same elements either way.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* x, int64_t p, bool aligned) {
  if (aligned) return reinterpret_cast<const Pack<T>*>(x)[p];
  Pack<T> v;
  for (int k = 0; k < kPack; ++k) v.v[k] = x[p * kPack + k];
  return v;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* x, int64_t p, const Pack<T>& v, bool aligned) {
  if (aligned) {
    reinterpret_cast<Pack<T>*>(x)[p] = v;
    return;
  }
  for (int k = 0; k < kPack; ++k) x[p * kPack + k] = v.v[k];
}

// One term of a sum of squares. SumSquares and lars_sgd_'s update (summing the new w for
// the next call) both call it, so that both compile to the same operation (one fused
// multiply-add under nvcc's default --fmad=true).
template <typename A>
__device__ __forceinline__ void add_square(A& sum, A v) { sum += v * v; }

// Bits of TensorListMeta::flag in the norm passes.
constexpr uint8_t kFlagExcluded = 1;   // LarsCoefs: no trust ratio (r = 1)
constexpr uint8_t kFlagCachedKey = 2;  // lars_sgd_'s w_norm_key matched on the host

// lars_sgd_'s cached ||w||^2 of the tensor: >= 0 when its key matched on the host (flag)
// and its entry of w_norm_sq (fp64, by argument index) is >= 0 (NaN is not); else -1.
__device__ __forceinline__ double cached_w_norm_sq(const double* w_cache, uint8_t flag,
                                                   int32_t index) {
  if (w_cache == nullptr || (flag & kFlagCachedKey) == 0) return -1.0;
  const double v = w_cache[index];
  return v >= 0.0 ? v : -1.0;
}

// Sum over the block in a fixed order (warp shuffles, then one warp over the warps'
// sums): the same inputs give the same bits on every run. Valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

// ------------------------------------------------------------------------ functors

// Pass 1: partial[d * total_chunks + chunk] = sum of squares of list d over the chunk.
// List 1 (the gradient) is divided by grad_scale first, as the reference does.
template <typename T, int DEPTH>
struct SumSquares {
  using A = opmath_t<T>;
  A* partial;
  int64_t total_chunks;
  DeviceScalar grad_scale;
  DeviceScalar found_inf;
  GivenNorms given;  // list d's norm given by norm_sq (row d): that list is not read
  // lars_sgd_'s w_norm_sq: list 0 is not read on a hit. A skipped step writes no new w,
  // so list 0 of a tensor whose entry is not valid is then summed here, norm_sq or not
  // (StoreWNormSq stores it; skipped steps are rare); nothing else is read.
  const double* w_cache = nullptr;

  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int slot,
                                             int64_t chunk) const {
    const bool skipped = found_inf.nonzero();
    if (skipped && w_cache == nullptr) return;
    bool use[DEPTH];
    bool any = false;
    for (int d = 0; d < DEPTH; ++d) {
      use[d] = !skipped && !(given.load(d, meta.index[slot]) >= 0.0);
      if (d == 0 && w_cache != nullptr)
        use[d] = (use[d] || skipped) &&
                 !(cached_w_norm_sq(w_cache, meta.flag[slot], meta.index[slot]) >= 0.0);
      any = any || use[d];
    }
    if (!any) return;  // every norm given (the same for the whole block)
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    const T* x[DEPTH];
    bool vec[DEPTH];
    for (int d = 0; d < DEPTH; ++d) {
      x[d] = static_cast<const T*>(meta.addresses[d][slot]) + begin;
      vec[d] = use[d] && pack_aligned(x[d]);
    }
    const A scale = grad_scale.set() ? grad_scale.get<A>() : A(1);
    A sums[DEPTH];
    for (int d = 0; d < DEPTH; ++d) sums[d] = A(0);
    auto add = [&](int d, A v) {
      if (d == 1 && grad_scale.set()) v = v / scale;
      add_square(sums[d], v);
    };
    // Packs first, then the tail: a thread's elements do not depend on the alignment.
    const int64_t n_packs = n / kPack;
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x)
      for (int d = 0; d < DEPTH; ++d) {
        if (!use[d]) continue;
        const Pack<T> pk = load_pack(x[d], p, vec[d]);
        for (int k = 0; k < kPack; ++k) add(d, load_acc(&pk.v[k]));
      }
    for (int64_t i = n_packs * kPack + threadIdx.x; i < n; i += blockDim.x)
      for (int d = 0; d < DEPTH; ++d)
        if (use[d]) add(d, load_acc(x[d] + i));
    for (int d = 0; d < DEPTH; ++d) {
      const A s = block_sum(sums[d]);
      if (threadIdx.x == 0) partial[d * total_chunks + meta.first_chunk[slot] + chunk] = s;
    }
  }
};

// Sum of the partials of one tensor (list d), in a fixed order. Valid in thread 0.
template <typename A>
__device__ __forceinline__ A tensor_sum(const A* partial, int64_t first, int64_t count) {
  A s = A(0);
  for (int64_t c = threadIdx.x; c < count; c += blockDim.x) s += partial[first + c];
  return block_sum(s);
}

// Per-tensor coefficients of an update, written by LarsCoefs and read by the update pass.
struct TensorCoefs {
  double r;      // trust ratio
  double wd;     // weight decay applied
  double first;  // 1 on the first momentum step (buf = d), else 0
};

// Pass 2 of lars_sgd_ and of extrap_sgd_ with lars: list 0 holds each tensor's step
// counter (float; null without momentum or without counters), the flag says "excluded".
template <typename T>
struct LarsCoefs {
  using A = opmath_t<T>;
  const A* partial;
  int64_t total_chunks;
  TensorCoefs* coefs;
  double lr, weight_decay, trust_coefficient, eps;
  DeviceScalar lr_tensor;
  DeviceScalar found_inf;
  bool clip, zero_norm_decay, has_momentum;
  DeviceScalar grad_scale;  // divides a given ||g|| (the partials are of g / scale already)
  GivenNorms given;
  // lars_sgd_'s w_norm_sq: a cached sum (an A stored as double: exact) stands for the
  // partials of w, which SumSquares did not write; norm_sq's row 0 takes precedence.
  const double* w_cache = nullptr;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    if (found_inf.nonzero()) return;  // a skipped step counts nothing
    const bool excluded = (meta.flag[slot] & kFlagExcluded) != 0;
    const int64_t first = meta.first_chunk[slot];
    // An excluded tensor's entries are never read; a given norm's partials were not written.
    double given_w = excluded ? -1.0 : given.load(0, meta.index[slot]);
    if (!excluded && !(given_w >= 0.0))
      given_w = cached_w_norm_sq(w_cache, meta.flag[slot], meta.index[slot]);
    const double given_g = excluded ? -1.0 : given.load(1, meta.index[slot]);
    const int64_t count = excluded ? 0 : num_chunks(meta.numel[slot]);
    const A sum_w = tensor_sum(partial, first, given_w >= 0.0 ? 0 : count);
    const A sum_g = tensor_sum(partial + total_chunks, first, given_g >= 0.0 ? 0 : count);
    if (threadIdx.x != 0) return;
    // A given norm: sqrt of the entry rounded to A (as the reference's .to(dtype)).
    const A n_w = given_w >= 0.0 ? sqrt_rn(static_cast<A>(given_w)) : sqrt_rn(sum_w);
    A n_g = sqrt_rn(sum_g);
    if (given_g >= 0.0) {
      n_g = sqrt_rn(static_cast<A>(given_g));
      if (grad_scale.set()) n_g = n_g / grad_scale.get<A>();
    }
    const A lr_v = lr_tensor.set() ? lr_tensor.get<A>() : static_cast<A>(lr);
    const LarsScale<A> s = lars_scale<A>(n_w, n_g, lr_v,
                                         static_cast<A>(weight_decay),
                                         static_cast<A>(trust_coefficient), static_cast<A>(eps),
                                         clip, zero_norm_decay, excluded);
    TensorCoefs& c = coefs[meta.index[slot]];
    c.r = s.r;
    c.wd = s.wd;
    float* step = static_cast<float*>(meta.addresses[0][slot]);
    c.first = 0.0;  // without counters, zero-initialised buffers make m * 0 + d the first step
    if (has_momentum && step != nullptr) {
      c.first = *step == 0.f ? 1.0 : 0.0;
      *step += 1.f;  // the update pass reads `first` from the coefficients, not the counter
    }
  }
};

}  // namespace lbkernels::cuda
