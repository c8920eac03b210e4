// CUDA functors of extrap_sgd_ and extrap_adam_ (docs/algorithms.md section 2).
//
// extrap_sgd_, per dtype group, in stream order and without any host sync:
//   [lars]   SumSquares<T, 2> over (x, g) and LarsCoefs<T> (common.cuh): the trust
//            ratio of every tensor from ||x|| and ||g||, deterministic, no atomics;
//   update   ExtrapSgdUpdate (a block per chunk): the momentum-SGD step of the anchor x
//            and the extrapolated point w = x - extrap_lr * gk, or w = x + noise;
//   [filter] FilterSums (a block per chunk): sums of x^2 and r^2 over every piece of an
//            output filter that lies in the chunk, into one slot per piece;
//            FilterFactors (a block per tensor): each filter's pieces added in order,
//            its factor a * ||x_j|| / (||r_j|| + 1e-6);
//            FilterWrite (a block per chunk): w = x + r * factor_j.
// extrap_adam_'s functors are in extrap_adam_kernels.cuh.
// Random numbers come from lbkernels/philox.h (counter layout documented there): a
// value is regenerated wherever it is needed from its counter, so the filter passes see
// the same r without storing it, and one Philox call serves four consecutive elements.
// The per-element math is lbkernels/math.h and extrap_math.h, shared with the CPU
// kernels. The AMP found_inf flag is read on the device by every block: when set,
// nothing is written.
//
// Depends on the CUDA runtime headers only (see multi_tensor_apply.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <lbkernels/extrap_math.h>
#include <lbkernels/math.h>
#include <lbkernels/philox.h>

#include "common.cuh"

namespace lbkernels::cuda {

// ---------------------------------------------------------------------------- noise

// The (seed, offset) of one call; with a tensor index it makes a PhiloxStream.
struct NoiseKey {
  uint64_t seed;
  uint64_t offset;
};

// The four values of elements 4q .. 4q+3 of tensor `index`: N(0, 1) for "gaussian",
// U(-1, 1) for the other variants, computed in fp32 (philox.h) and widened to A.
template <typename A>
__device__ __forceinline__ void noise4(const NoiseKey& key, int32_t index, int64_t q,
                                       Extrapolation mode, A z[kPack]) {
  const PhiloxStream stream(key.seed, key.offset, static_cast<uint32_t>(index));
  float v[4];
  philox_values(stream.block(static_cast<uint64_t>(q)), mode == Extrapolation::kGaussian, v);
#pragma unroll
  for (int k = 0; k < kPack; ++k) z[k] = static_cast<A>(v[k]);
}

// The value of element e alone (the unaligned and tail paths).
template <typename A>
__device__ __forceinline__ A noise1(const NoiseKey& key, int32_t index, int64_t e,
                                    Extrapolation mode) {
  A z[kPack];
  noise4<A>(key, index, e / kPack, mode, z);
  const int64_t k = e % kPack;  // selected without a run-time index (keeps z in registers)
  return k == 0 ? z[0] : k == 1 ? z[1] : k == 2 ? z[2] : z[3];
}

// ---------------------------------------------------------------------- extrap_sgd_

// Pass "update" of extrap_sgd_: lists w, x, buf (null without momentum), g, gk (null
// without local gradients, then gk = g; unused by the noise variants).
template <typename T>
struct ExtrapSgdUpdate {
  using A = opmath_t<T>;
  const TensorCoefs* coefs;  // trust ratios by tensor index; null without lars
  double lr, extrap_lr, momentum, weight_decay, noise_scale;
  DeviceScalar lr_tensor, extrap_lr_tensor, grad_scale, found_inf;
  NoiseKey key;
  Extrapolation mode;
  bool has_momentum, nesterov;

  __device__ __forceinline__ void operator()(const TensorListMeta<5>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    const int32_t index = meta.index[slot];
    const bool has_scale = grad_scale.set();
    const A scale = has_scale ? grad_scale.get<A>() : A(1);
    const A lr_v = lr_tensor.set() ? lr_tensor.get<A>() : static_cast<A>(lr);
    const A elr = extrap_lr_tensor.set() ? extrap_lr_tensor.get<A>() : static_cast<A>(extrap_lr);
    const A a = static_cast<A>(noise_scale);
    // buf = m * buf + d (zero-initialised buffers: no first-step case, no dampening).
    const SgdCoefs<A> c{scale, static_cast<A>(weight_decay),
                        coefs != nullptr ? static_cast<A>(coefs[index].r) : A(1),
                        A(1), static_cast<A>(momentum), A(1), lr_v};

    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    T* x = static_cast<T*>(meta.addresses[1][slot]) + begin;
    T* buf = has_momentum ? static_cast<T*>(meta.addresses[2][slot]) + begin : nullptr;
    const T* g = static_cast<const T*>(meta.addresses[3][slot]) + begin;
    const T* gk = mode == Extrapolation::kPastGrad && meta.addresses[4][slot] != nullptr
                      ? static_cast<const T*>(meta.addresses[4][slot]) + begin
                      : nullptr;
    const bool write_w = mode != Extrapolation::kFilter;  // the filter passes write w
    const bool draws = mode != Extrapolation::kPastGrad && write_w;

    // One element, in the arithmetic type: updates x and buf, returns w. z is the
    // element's random number (draws only), gkv its local gradient (past_grad with
    // local gradients).
    auto update = [&](A& xv, A& bv, A gv, A gkv, A z) -> A {
      sgd_update(xv, bv, gv, c, has_scale, has_momentum, nesterov, false);
      if (mode == Extrapolation::kPastGrad) {
        if (gk == nullptr) gkv = gv;
        if (has_scale) gkv = gkv / scale;
        return extrap_point(xv, gkv, elr);
      }
      return mode == Extrapolation::kWeight ? weight_noise_point(xv, z, a) : noise_point(xv, z, a);
    };

    int64_t i = 0;
    if (pack_aligned(w) && pack_aligned(x) && pack_aligned(g) &&
        (!has_momentum || pack_aligned(buf)) && (gk == nullptr || pack_aligned(gk))) {
      // begin is a multiple of kChunkSize: pack p holds elements 4 (begin / 4 + p) + k,
      // the four values of one Philox block.
      const int64_t n_packs = n / kPack;
      for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
        Pack<T> wk, bk, gkk;
        Pack<T> xk = reinterpret_cast<const Pack<T>*>(x)[p];
        const Pack<T> gp = reinterpret_cast<const Pack<T>*>(g)[p];
        if (has_momentum) bk = reinterpret_cast<const Pack<T>*>(buf)[p];
        if (gk != nullptr) gkk = reinterpret_cast<const Pack<T>*>(gk)[p];
        A z[kPack] = {};
        if (draws) noise4<A>(key, index, begin / kPack + p, mode, z);
#pragma unroll
        for (int k = 0; k < kPack; ++k) {  // unrolled: z and the packs stay in registers
          A xv = load_acc(&xk.v[k]);
          A bv = has_momentum ? load_acc(&bk.v[k]) : A(0);
          const A wv = update(xv, bv, load_acc(&gp.v[k]),
                              gk != nullptr ? load_acc(&gkk.v[k]) : A(0), z[k]);
          store_acc(&xk.v[k], xv);
          if (has_momentum) store_acc(&bk.v[k], bv);
          if (write_w) store_acc(&wk.v[k], wv);
        }
        reinterpret_cast<Pack<T>*>(x)[p] = xk;
        if (has_momentum) reinterpret_cast<Pack<T>*>(buf)[p] = bk;
        if (write_w) reinterpret_cast<Pack<T>*>(w)[p] = wk;
      }
      i = n_packs * kPack;
    }
    for (i += threadIdx.x; i < n; i += blockDim.x) {
      A xv = load_acc(x + i);
      A bv = has_momentum ? load_acc(buf + i) : A(0);
      const A wv = update(xv, bv, load_acc(g + i), gk != nullptr ? load_acc(gk + i) : A(0),
                          draws ? noise1<A>(key, index, begin + i, mode) : A(0));
      store_acc(x + i, xv);
      if (has_momentum) store_acc(buf + i, bv);
      if (write_w) store_acc(w + i, wv);
    }
  }
};

// ------------------------------------------------------------------ filter variant
//
// A tensor of shape (n_0, ...) with ndim >= 2 has n_0 filters of F = numel / n_0
// elements (dim 0 is the output filter); a 0-d or 1-d tensor is one filter. Filters and
// 64K chunks cut a tensor into pieces (a piece is a filter's part in one chunk), numbered
// in memory order; a filter's pieces are consecutive.

// Per tensor (by its index in the op's argument list), written by the host.
struct FilterInfo {
  int64_t filter_size;  // F, elements per filter (> 0 for non-empty tensors)
  int64_t piece_base;   // slot of the tensor's first piece in the call's partials
  int64_t filter_base;  // slot of the tensor's first filter in the call's factors
};

// Number of the piece holding element p of a tensor with filters of F elements: the
// filter and chunk boundaries in (0, p], a boundary that is both counted once.
__host__ __device__ inline int64_t piece_of(int64_t p, int64_t f) {
  // Common boundaries are the multiples of lcm(F, kChunkSize) = (F / gcd) * kChunkSize,
  // gcd = the largest power of two dividing both (kChunkSize is a power of two).
  int64_t gcd = 1;
  while (gcd < kChunkSize && f % (2 * gcd) == 0) gcd *= 2;
  const int64_t q = f / gcd;
  const int64_t common = q > INT64_MAX / kChunkSize ? 0 : p / (q * kChunkSize);
  return p / f + p / kChunkSize - common;
}

// Pieces of a tensor of `numel` elements (> 0) with filters of F elements.
__host__ __device__ inline int64_t num_pieces(int64_t numel, int64_t f) {
  return piece_of(numel - 1, f) + 1;
}

// The pieces of one chunk: piece k (0 <= k < count) is the part of filter j_lo + k in the
// chunk, numbered first + k in the tensor.
struct ChunkPieces {
  int64_t begin, n, f, j_lo, count, first;

  __host__ __device__ ChunkPieces(int64_t chunk, int64_t numel, int64_t filter_size)
      : begin(chunk * kChunkSize),
        n(min(kChunkSize, numel - chunk * kChunkSize)),
        f(filter_size),
        j_lo(begin / f),
        count((begin + n - 1) / f - j_lo + 1),
        first(piece_of(begin, f)) {}

  // Bounds [lo, hi) of piece k, relative to the chunk's first element.
  __host__ __device__ void bounds(int64_t k, int64_t& lo, int64_t& hi) const {
    lo = max((j_lo + k) * f - begin, int64_t(0));
    hi = min((j_lo + k + 1) * f - begin, n);
  }
};

// The pieces of filter j: numbers first .. last, consecutive.
__host__ __device__ inline void filter_pieces(int64_t j, int64_t f, int64_t& first, int64_t& last) {
  first = piece_of(j * f, f);
  last = piece_of((j + 1) * f - 1, f);
}

// Filter pieces shorter than this are summed by one thread, up to kBlockPiece by one
// warp, longer ones by the whole block (at most 65536 / 2048 + 1 = 33 such per chunk).
constexpr int64_t kWarpPiece = 32;
constexpr int64_t kBlockPiece = 2048;

// Pass "filter sums": for every piece of the chunk, sum x^2 into partial[slot] and
// r^2 into partial[total_pieces + slot]. List 0: x (already updated).
template <typename T>
struct FilterSums {
  using A = opmath_t<T>;
  A* partial;
  int64_t total_pieces;
  const FilterInfo* info;
  NoiseKey key;
  DeviceScalar found_inf;

  // x^2 and r^2 over elements [lo, hi) of the chunk (relative to begin, a multiple of
  // 4), visited by Philox group: lane `lane` of `width` lanes takes groups lane, lane +
  // width, ... One Philox call serves the four elements of a group.
  __device__ __forceinline__ void piece_sums(const T* x, int64_t begin, int64_t lo, int64_t hi,
                                             int32_t index, int lane, int width, A& sx,
                                             A& sr) const {
    for (int64_t grp = lo / kPack + lane; grp * kPack < hi; grp += width) {
      A z[kPack];
      noise4<A>(key, index, begin / kPack + grp, Extrapolation::kFilter, z);
      for (int k = 0; k < kPack; ++k) {
        const int64_t e = grp * kPack + k;
        if (e < lo || e >= hi) continue;
        const A v = load_acc(x + e);
        sx += v * v;
        sr += z[k] * z[k];
      }
    }
  }

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    const int32_t index = meta.index[slot];
    const FilterInfo fi = info[index];
    const ChunkPieces cp(chunk, meta.numel[slot], fi.filter_size);
    const int64_t f = cp.f, begin = cp.begin, pieces = cp.count;
    const T* x = static_cast<const T*>(meta.addresses[0][slot]) + begin;
    A* out = partial + fi.piece_base + cp.first;  // slot of the chunk's piece 0
    if (pieces == 1 || f >= kBlockPiece) {
      for (int64_t k = 0; k < pieces; ++k) {  // the whole block on each piece, in turn
        int64_t lo, hi;
        cp.bounds(k, lo, hi);
        A sx = A(0), sr = A(0);
        piece_sums(x, begin, lo, hi, index, threadIdx.x, blockDim.x, sx, sr);
        sx = block_sum(sx);
        sr = block_sum(sr);
        if (threadIdx.x == 0) {
          out[k] = sx;
          out[total_pieces + k] = sr;
        }
      }
    } else if (f >= kWarpPiece) {  // a warp per piece
      const int lane = threadIdx.x % 32;
      for (int64_t k = threadIdx.x / 32; k < pieces; k += blockDim.x / 32) {
        int64_t lo, hi;
        cp.bounds(k, lo, hi);
        A sx = A(0), sr = A(0);
        piece_sums(x, begin, lo, hi, index, lane, 32, sx, sr);
        for (int o = 16; o > 0; o /= 2) {
          sx += __shfl_down_sync(0xffffffffu, sx, o);
          sr += __shfl_down_sync(0xffffffffu, sr, o);
        }
        if (lane == 0) {
          out[k] = sx;
          out[total_pieces + k] = sr;
        }
      }
    } else {  // a thread per piece (fewer than 32 elements each)
      for (int64_t k = threadIdx.x; k < pieces; k += blockDim.x) {
        int64_t lo, hi;
        cp.bounds(k, lo, hi);
        A sx = A(0), sr = A(0);
        piece_sums(x, begin, lo, hi, index, 0, 1, sx, sr);
        out[k] = sx;
        out[total_pieces + k] = sr;
      }
    }
  }
};

// Pass "filter factors": factor[filter_base + j] = a * ||x_j|| / (||r_j|| + 1e-6), the
// filter's pieces added in order (deterministic). One block per non-empty tensor.
template <typename T>
struct FilterFactors {
  using A = opmath_t<T>;
  const A* partial;
  int64_t total_pieces;
  const FilterInfo* info;
  A* factor;
  double noise_scale;
  DeviceScalar found_inf;

  __device__ __forceinline__ A factor_of(A sx, A sr) const {
    return static_cast<A>(noise_scale) * sqrt_rn(sx) / (sqrt_rn(sr) + A(1e-6));
  }

  __device__ __forceinline__ void operator()(const TensorListMeta<1>& meta, int slot,
                                             int64_t) const {
    if (found_inf.nonzero()) return;
    const FilterInfo fi = info[meta.index[slot]];
    const int64_t f = fi.filter_size;
    const int64_t filters = meta.numel[slot] / f;
    if (filters == 1) {  // one filter, possibly many pieces: the whole block adds them
      const int64_t count = num_pieces(meta.numel[slot], f);
      const A sx = tensor_sum(partial, fi.piece_base, count);
      const A sr = tensor_sum(partial + total_pieces, fi.piece_base, count);
      if (threadIdx.x == 0) factor[fi.filter_base] = factor_of(sx, sr);
      return;
    }
    for (int64_t j = threadIdx.x; j < filters; j += blockDim.x) {
      int64_t first, last;
      filter_pieces(j, f, first, last);
      A sx = A(0), sr = A(0);
      for (int64_t s = fi.piece_base + first; s <= fi.piece_base + last; ++s) {
        sx += partial[s];
        sr += partial[total_pieces + s];
      }
      factor[fi.filter_base + j] = factor_of(sx, sr);
    }
  }
};

// Pass "filter write": w = x + r * factor_j. Lists w, x (x already updated).
template <typename T>
struct FilterWrite {
  using A = opmath_t<T>;
  const FilterInfo* info;
  const A* factor;
  NoiseKey key;
  DeviceScalar found_inf;

  __device__ __forceinline__ void operator()(const TensorListMeta<2>& meta, int slot,
                                             int64_t chunk) const {
    if (found_inf.nonzero()) return;
    const int32_t index = meta.index[slot];
    const FilterInfo fi = info[index];
    const int64_t begin = chunk * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
    T* w = static_cast<T*>(meta.addresses[0][slot]) + begin;
    const T* x = static_cast<const T*>(meta.addresses[1][slot]) + begin;
    const A* fac = factor + fi.filter_base;
    // By Philox group of 4 (begin is a multiple of 4): one call per 4 elements.
    const int64_t groups = (n + kPack - 1) / kPack;
    for (int64_t grp = threadIdx.x; grp < groups; grp += blockDim.x) {
      A z[kPack];
      noise4<A>(key, index, begin / kPack + grp, Extrapolation::kFilter, z);
      for (int k = 0; k < kPack; ++k) {
        const int64_t e = grp * kPack + k;
        if (e >= n) break;
        store_acc(w + e, noise_point(static_cast<A>(load_acc(x + e)), z[k],
                                     fac[(begin + e) / fi.filter_size]));
      }
    }
  }
};

}  // namespace lbkernels::cuda
