// CUDA functors of lamb_ (docs/algorithms.md section 7).
//
// Per call, in stream order and without any host sync:
//   0. with max_grad_norm and no grad_norm: SumSquares (common.cuh) over every gradient,
//      each dtype group's partials summed by lamb_group_sum, then lamb_clip_kernel turns
//      the norm into the clipping divisor c (one double on the device);
// then per dtype group:
//   1. LambMoments (a block per chunk): the new moments and the direction u of each
//      element, and the chunk's sums of squares of w and u;
//   2. LambRatio (a block per tensor): its partials added in a fixed order, the trust
//      ratio, then the step counted;
//   3. LambUpdate (a block per chunk): w = lamb_write(w, u, lr, r) and, with DEPTH 5, the
//      folded weight averaging.
// u in pass 3 is the u pass 1 took the norm of: fp32/fp64 moments are stored exactly by
// pass 1 and read back (w, g, m, v in and m, v out; then w, m, v in and w out: 10
// accesses per element); 16-bit ones would round, so pass 1 stores nothing and pass 3
// computes them again from g and the old moments (11 accesses of 2-byte elements). The
// per-element math is lbkernels/lamb_math.h, shared with the CPU kernel. The AMP
// found_inf flag is read on the device by every block: when set, nothing is written.
//
// The stages (stage="moments" | "update") split the call at pass 2. "moments" runs pass 1
// storing the moments of every dtype (16-bit ones rounded, after u took the unrounded
// values for its norm, as the full step), then pass 2 writes the tensor's sums (in A, as
// the full step adds them) into norm_sq and counts the step; "update" runs pass 2 on the
// sums norm_sq gives (the counters already counted) and pass 3 from the stored moments
// of every dtype: w, m, v in and w out. For 16-bit tensors the two stages move 12 + 8
// bytes per element where the full step moves 8 + 14, and the update's u comes from the
// rounded moments (the full step's from the unrounded ones: not bit for bit there).
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cstdint>

#include <lbkernels/lamb_math.h>

#include "common.cuh"
#include "average_kernels.cuh"  // FoldedAverage

namespace lbkernels::cuda {

// Per-tensor values pass 2 writes and pass 3 reads (doubles: per_tensor_scratch).
struct LambTensor {
  double r;  // trust ratio
  double t;  // the step this call takes (the counter before pass 2 counted it, plus 1)
};

// The scalars every pass reads: the op's options, the AMP scale and the clipping divisor.
struct LambScalars {
  LambOptions o;
  DeviceScalar grad_scale;
  DeviceScalar clip;  // c of the global clipping (a double on the device), when o.has_clip
  DeviceScalar found_inf;

  template <typename A>
  __device__ __forceinline__ LambCoefs<A> coefs(double t) const {
    return lamb_coefs<A>(o, t, grad_scale.set() ? grad_scale.get<A>() : A(1),
                         clip.set() ? clip.get<A>() : A(1));
  }
};

// Pass 0: out = the sum of partial[0, count), in a fixed order (one block).
template <typename A>
__global__ void lamb_group_sum(const A* partial, int64_t count, double* out) {
  const A s = tensor_sum(partial, 0, count);
  if (threadIdx.x == 0) *out = static_cast<double>(s);
}

// Pass 0: the clipping divisor from N, the norm of the scaled gradients: grad_norm when
// given, else the square root of the groups' sums (the reference's norm of per-tensor
// norms, rounded to fp32 unless every gradient is fp64); then N / grad_scale, and
// c = N / max_grad_norm when N > max_grad_norm, else 1, in N's dtype.
template <typename C>
__global__ void lamb_clip_kernel(const double* group_sums, int n_groups, DeviceScalar grad_norm,
                                 DeviceScalar grad_scale, double max_grad_norm, double* clip) {
  double sum = 0.0;
  for (int k = 0; k < n_groups; ++k) sum += group_sums[k];
  C n = grad_norm.set() ? grad_norm.get<C>() : static_cast<C>(sqrt_rn(sum));
  if (grad_scale.set()) n = n / grad_scale.get<C>();
  const C max = static_cast<C>(max_grad_norm);
  *clip = static_cast<double>(n > max ? n / max : C(1));
}

// Pass 1: lists w, g, m, v and the tensor's step counter (not offset by chunk); the flag
// says "excluded" (r = 1: no sums written, pass 2 reads none).
template <typename T>
struct LambMoments {
  using A = opmath_t<T>;
  A* partial;
  int64_t total_chunks;
  LambScalars s;
  bool store;  // fp32/fp64: the moments stored here, exactly

  __device__ __forceinline__ void operator()(const TensorListMeta<5>& meta, int slot,
                                             int64_t chunk) const {
    if (s.found_inf.nonzero()) return;
    const double t = static_cast<double>(*static_cast<const float*>(meta.addresses[4][slot])) + 1.0;
    const LambCoefs<A> c = s.coefs<A>(t);
    const LambFlags f = lamb_flags(s.o, c);
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    const T* w = static_cast<const T*>(meta.addresses[0][slot]) + begin;
    const T* g = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    T* m = static_cast<T*>(meta.addresses[2][slot]) + begin;
    T* v = static_cast<T*>(meta.addresses[3][slot]) + begin;
    A sum_w = A(0), sum_u = A(0);
    auto element = [&](const T& wk, const T& gk, T& mk, T& vk) {
      const A wv = load_acc(&wk);
      A mv = load_acc(&mk), vv = load_acc(&vk);
      lamb_moments(mv, vv, static_cast<A>(load_acc(&gk)), wv, c, f);
      if (store) {
        store_acc(&mk, mv);
        store_acc(&vk, vv);
      }
      const A u = lamb_direction(mv, vv, wv, c, f);
      sum_w += wv * wv;
      sum_u += u * u;
    };
    int64_t i = 0;
    if (pack_aligned(w) && pack_aligned(g) && pack_aligned(m) && pack_aligned(v)) {
      const int64_t n_packs = n / kPack;
      for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
        const Pack<T> wk = reinterpret_cast<const Pack<T>*>(w)[p];
        const Pack<T> gk = reinterpret_cast<const Pack<T>*>(g)[p];
        Pack<T> mk = reinterpret_cast<const Pack<T>*>(m)[p];
        Pack<T> vk = reinterpret_cast<const Pack<T>*>(v)[p];
        for (int k = 0; k < kPack; ++k) element(wk.v[k], gk.v[k], mk.v[k], vk.v[k]);
        if (store) {
          reinterpret_cast<Pack<T>*>(m)[p] = mk;
          reinterpret_cast<Pack<T>*>(v)[p] = vk;
        }
      }
      i = n_packs * kPack;
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) element(w[i], g[i], m[i], v[i]);
    const A bw = block_sum(sum_w);
    const A bu = block_sum(sum_u);
    if (threadIdx.x == 0 && meta.flag[slot] == 0) {
      partial[meta.first_chunk[slot] + chunk] = bw;
      partial[total_chunks + meta.first_chunk[slot] + chunk] = bu;
    }
  }
};

// The op's norm_sq in a stage (null in the full step): row 0 the sums of squares of w,
// row 1 those of u, by argument index; written by "moments", read by "update".
struct LambNormSq {
  void* ptr = nullptr;
  bool fp64 = false;
  int64_t n = 0;        // len(params): the row length
  bool given = false;   // stage "update": the sums are read, not written

  __device__ __forceinline__ double load(int row, int32_t index) const {
    const int64_t k = row * n + index;
    return fp64 ? static_cast<const double*>(ptr)[k]
                : static_cast<double>(static_cast<const float*>(ptr)[k]);
  }
  template <typename A>
  __device__ __forceinline__ void store(int row, int32_t index, A value) const {
    const int64_t k = row * n + index;
    if (fp64) {
      static_cast<double*>(ptr)[k] = static_cast<double>(value);
    } else {
      static_cast<float*>(ptr)[k] = static_cast<float>(value);
    }
  }
};

// Pass 2: list 0 holds the tensor's step counter; the flag says "excluded".
template <typename T>
struct LambRatio {
  using A = opmath_t<T>;
  const A* partial;
  int64_t total_chunks;
  LambTensor* tensors;
  LambScalars s;
  LambNormSq norm_sq;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    if (s.found_inf.nonzero()) return;  // a skipped step counts nothing
    const bool excluded = meta.flag[slot] != 0;
    const int32_t index = meta.index[slot];
    float* step = static_cast<float*>(meta.addresses[0][slot]);
    LambTensor& out = tensors[index];
    if (norm_sq.given) {  // stage "update": the moments stage counted the step
      if (threadIdx.x != 0) return;
      // The sums rounded to A, as the full step holds them (exact from its own stores).
      out.r = lamb_ratio<A>(sqrt_rn(static_cast<A>(norm_sq.load(0, index))),
                            sqrt_rn(static_cast<A>(norm_sq.load(1, index))),
                            s.o.has_max_trust, static_cast<A>(s.o.max_trust), s.o.clip,
                            excluded);
      out.t = static_cast<double>(*step);
      return;
    }
    const int64_t first = meta.first_chunk[slot];
    const int64_t count = excluded ? 0 : num_chunks(meta.numel[slot]);
    const A sum_w = tensor_sum(partial, first, count);  // 0 for an excluded tensor
    const A sum_u = tensor_sum(partial + total_chunks, first, count);
    if (threadIdx.x != 0) return;
    if (norm_sq.ptr != nullptr) {  // stage "moments"
      norm_sq.store(0, index, sum_w);
      norm_sq.store(1, index, sum_u);
    } else {
      out.r = lamb_ratio<A>(sqrt_rn(sum_w), sqrt_rn(sum_u), s.o.has_max_trust,
                            static_cast<A>(s.o.max_trust), s.o.clip, excluded);
      out.t = static_cast<double>(*step) + 1.0;
    }
    *step += 1.f;  // after pass 1 read it (stream order); pass 3 reads out.t
  }
};

// Pass 3: lists w, g, m, v and, with DEPTH 5, the averages (opmath_t<T>) of the folded
// weight averaging.
template <typename T, int DEPTH = 4>
struct LambUpdate {
  using A = opmath_t<T>;
  static_assert(DEPTH == 4 || DEPTH == 5, "LambUpdate: lists w, g, m, v[, avg]");
  const LambTensor* tensors;
  LambScalars s;
  DeviceScalar lr_tensor;
  bool stored;  // pass 1 stored the moments: read them, do not compute them again
  FoldedAverage average;  // read only with DEPTH 5

  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int slot,
                                             int64_t chunk) const {
    if (s.found_inf.nonzero()) return;
    const LambTensor tt = tensors[meta.index[slot]];
    const LambCoefs<A> c = s.coefs<A>(tt.t);
    const LambFlags f = lamb_flags(s.o, c);
    const A lr = lr_tensor.set() ? lr_tensor.get<A>() : static_cast<A>(s.o.lr);
    const A r = static_cast<A>(tt.r);
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    const T* g = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    T* m = static_cast<T*>(meta.addresses[2][slot]) + begin;
    T* v = static_cast<T*>(meta.addresses[3][slot]) + begin;
    constexpr bool kAverage = DEPTH == 5;
    A* avg = nullptr;
    A r_avg = A(0);
    if constexpr (kAverage) {
      avg = static_cast<A*>(meta.addresses[DEPTH - 1][slot]) + begin;
      r_avg = average.rate<A>();
    }
    auto element = [&](T& wk, const T& gk, T& mk, T& vk, A& ak) {
      const A wv = load_acc(&wk);
      A mv = load_acc(&mk), vv = load_acc(&vk);
      if (!stored) {
        lamb_moments(mv, vv, static_cast<A>(load_acc(&gk)), wv, c, f);
        store_acc(&mk, mv);
        store_acc(&vk, vv);
      }
      store_acc(&wk, lamb_write(wv, lamb_direction(mv, vv, wv, c, f), lr, r, f.apex));
      // The stored (rounded) weight, as average_ would read it.
      if constexpr (kAverage) ak = average_update<A>(ak, static_cast<A>(load_acc(&wk)), r_avg);
    };
    int64_t i = 0;
    if (pack_aligned(w) && pack_aligned(g) && pack_aligned(m) && pack_aligned(v) &&
        (!kAverage || pack_aligned(avg))) {
      const int64_t n_packs = n / kPack;
      for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
        Pack<T> wk = reinterpret_cast<const Pack<T>*>(w)[p];
        Pack<T> gk, mk = reinterpret_cast<const Pack<T>*>(m)[p],
                    vk = reinterpret_cast<const Pack<T>*>(v)[p];
        Pack<A> ak;
        if (!stored) gk = reinterpret_cast<const Pack<T>*>(g)[p];
        if constexpr (kAverage) ak = reinterpret_cast<const Pack<A>*>(avg)[p];
        for (int k = 0; k < kPack; ++k) element(wk.v[k], gk.v[k], mk.v[k], vk.v[k], ak.v[k]);
        reinterpret_cast<Pack<T>*>(w)[p] = wk;
        if (!stored) {
          reinterpret_cast<Pack<T>*>(m)[p] = mk;
          reinterpret_cast<Pack<T>*>(v)[p] = vk;
        }
        if constexpr (kAverage) reinterpret_cast<Pack<A>*>(avg)[p] = ak;
      }
      i = n_packs * kPack;
    }
    A unused = A(0);
    for (i += threadIdx.x; i < n; i += blockDim.x)
      element(w[i], g[i], m[i], v[i], kAverage ? avg[i] : unused);
  }
};

}  // namespace lbkernels::cuda
