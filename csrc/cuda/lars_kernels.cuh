// CUDA functors of multi_tensor_l2norm and lars_sgd_ (docs/algorithms.md sections 1 and 6).
//
// Per dtype group, in stream order and without any host sync:
//   1. SumSquares (common.cuh): per-chunk sums of squares of w and of the unscaled g;
//   2. Norms / LarsCoefs (common.cuh): per tensor, its norms, and for LARS the trust
//      ratio, the first-step flag and the step count;
//   3. LarsUpdate (a block per chunk): sgd_update() with the tensor's coefficients;
//   4. with lars_sgd_'s cache of ||w||^2 (w_norm_sq): the update also sums the squares of
//      the new w as stored, each thread over the elements SumSquares gives it, into the
//      chunk partials, and StoreWNormSq adds them per tensor as LarsCoefs does: the
//      number the next call's passes 1-2 would compute from w, bit for bit.
// The per-element math is lbkernels/math.h, shared with the CPU kernels. The AMP
// found_inf flag is read on the device by every block: when set, no weight or state is
// written (with the cache, pass 1 still sums the w of tensors whose entry is not valid,
// and pass 4 stores those sums: w is unchanged, so they are its norms).
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cstdint>

#include <lbkernels/math.h>

#include "average_kernels.cuh"  // FoldedAverage
#include "common.cuh"

namespace lbkernels::cuda {

// Pass 2 of multi_tensor_l2norm: out[index] = sqrt(sum of its partials), as fp32.
template <typename T>
struct Norms {
  using A = opmath_t<T>;
  const A* partial;
  float* out;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    const A s = tensor_sum(partial, meta.first_chunk[slot], num_chunks(meta.numel[slot]));
    if (threadIdx.x == 0) out[meta.index[slot]] = static_cast<float>(sqrt_rn(s));
  }
};

// Pass 3 of lars_sgd_: lists w, g, buf (null without momentum), and with DEPTH 4 the
// averages of the folded weight averaging. w_sq (null: not asked): row 0 of the partials,
// where SumSquares puts a chunk's sum of w, gets the chunk's sum of the new w (not for
// an excluded tensor, flagged kFlagExcluded: StoreWNormSq leaves its entry alone).
template <typename T, int DEPTH = 3>
struct LarsUpdate {
  using A = opmath_t<T>;
  static_assert(DEPTH == 3 || DEPTH == 4, "LarsUpdate: lists w, g, buf[, avg]");
  const TensorCoefs* coefs;
  double lr, momentum, one_minus_dampening;
  DeviceScalar lr_tensor;
  DeviceScalar grad_scale;
  DeviceScalar found_inf;
  bool has_momentum, nesterov, paper;
  FoldedAverage average;  // read only with DEPTH 4
  A* w_sq = nullptr;

  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    const TensorCoefs tc = coefs[meta.index[slot]];
    const bool first = has_momentum && tc.first != 0.0;
    const A lr_v = lr_tensor.set() ? lr_tensor.get<A>() : static_cast<A>(lr);
    // momentum_style="paper" keeps lr in the buffer: d is scaled by lr and w -= u.
    const SgdCoefs<A> c{grad_scale.set() ? grad_scale.get<A>() : A(1),
                        static_cast<A>(tc.wd),
                        static_cast<A>(tc.r),
                        paper ? lr_v : A(1),
                        static_cast<A>(momentum),
                        first ? A(1) : static_cast<A>(one_minus_dampening),
                        paper ? A(1) : lr_v};
    const bool has_scale = grad_scale.set();

    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    const T* g = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    T* buf = has_momentum ? static_cast<T*>(meta.addresses[2][slot]) + begin : nullptr;
    constexpr bool kAverage = DEPTH == 4;
    A* avg = nullptr;
    A r_avg = A(0);
    if constexpr (kAverage) {
      avg = static_cast<A*>(meta.addresses[DEPTH - 1][slot]) + begin;
      r_avg = average.rate<A>();
    }
    const bool sum_w = w_sq != nullptr && !(meta.flag[slot] & kFlagExcluded);
    A sq = A(0);  // this thread's sum of the new w's squares, in SumSquares' order
    auto update = [&](T* wp, const T* gp, T* bp, A* ap) {
      A wv = load_acc(wp);
      A bv = has_momentum ? load_acc(bp) : A(0);
      sgd_update(wv, bv, static_cast<A>(load_acc(gp)), c, has_scale, has_momentum, nesterov,
                 first);
      store_acc(wp, wv);
      if (has_momentum) store_acc(bp, bv);
      // The stored (rounded) weight, as average_ and the next norm pass read it.
      const A stored = static_cast<A>(load_acc(wp));
      if (sum_w) add_square(sq, stored);
      if constexpr (kAverage) *ap = average_update<A>(*ap, stored, r_avg);
    };
    // SumSquares' element order (packs, then the tail), each list vector-accessed where
    // aligned: a thread's elements are the same whatever the alignment.
    const bool w_vec = pack_aligned(w);
    const bool g_vec = pack_aligned(g);
    const bool b_vec = has_momentum && pack_aligned(buf);
    const bool a_vec = kAverage && pack_aligned(avg);
    const int64_t n_packs = n / kPack;
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      Pack<T> wk = load_pack(w, p, w_vec);
      const Pack<T> gk = load_pack(g, p, g_vec);
      Pack<T> bk;
      Pack<A> ak;
      if (has_momentum) bk = load_pack<T>(buf, p, b_vec);
      if constexpr (kAverage) ak = load_pack<A>(avg, p, a_vec);
      for (int k = 0; k < kPack; ++k) update(&wk.v[k], &gk.v[k], &bk.v[k], &ak.v[k]);
      store_pack(w, p, wk, w_vec);
      if (has_momentum) store_pack(buf, p, bk, b_vec);
      if constexpr (kAverage) store_pack(avg, p, ak, a_vec);
    }
    for (int64_t i = n_packs * kPack + threadIdx.x; i < n; i += blockDim.x)
      update(w + i, g + i, has_momentum ? buf + i : nullptr, kAverage ? avg + i : nullptr);
    if (sum_w) {  // sum_w is the same for the whole block: every thread reaches block_sum
      const A s = block_sum(sq);
      if (threadIdx.x == 0) w_sq[meta.first_chunk[slot] + chunk] = s;
    }
  }
};

// Pass 4 of lars_sgd_ with the cache: per tensor (flags as LarsCoefs'), w_norm_sq[index] =
// the new w's chunk sums (LarsUpdate's w_sq) added as LarsCoefs adds them. Excluded
// tensors: untouched. On a skipped step w is unchanged: a valid entry stays, any other
// gets the sums of w that SumSquares then wrote to the same row.
template <typename T>
struct StoreWNormSq {
  using A = opmath_t<T>;
  const A* w_sq;
  double* w_norm_sq;
  DeviceScalar found_inf;

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    const uint8_t flag = meta.flag[slot];
    if (flag & kFlagExcluded) return;
    const int32_t index = meta.index[slot];
    const bool keep = found_inf.nonzero() && cached_w_norm_sq(w_norm_sq, flag, index) >= 0.0;
    const A s = tensor_sum(w_sq, meta.first_chunk[slot], keep ? 0 : num_chunks(meta.numel[slot]));
    if (threadIdx.x == 0 && !keep) w_norm_sq[index] = static_cast<double>(s);
  }
};

}  // namespace lbkernels::cuda
