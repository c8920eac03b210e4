// Non-temporal ("streaming") stores for outputs a pass writes without reading (extrap_sgd_'s
// and extrap_adam_'s extrapolated point w). A plain store of a line that is not cached first
// reads it for ownership, so a write-only fp32 output costs 8 bytes of traffic per element
// instead of 4 (past_grad: 32 bytes per parameter where 28 are needed). A streaming store
// writes the whole line without reading it; it is weakly ordered, so the writer ends its
// range with stream_fence() before another thread (the next op) may read the data.
//
// Only for fp32/fp64 vectors of the AVX2 / AVX512 builds, at addresses aligned to the
// vector width (32 / 64 bytes): a pass peels the elements before the first aligned
// address of the output (stream_head), streams whole vectors, and stores its tail plainly.
// The DEFAULT build and reduced dtypes keep plain stores (kCanStream false).
// Included by csrc/cpu/*_kernel.cpp after kernel_dispatch.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "kernel_dispatch.h"

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <typename T>
constexpr bool kCanStream = std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
template <typename T>
constexpr bool kCanStream = false;
#endif

// The bytes of one output tensor from which its writes stream (LBK_CPU_STREAM_BYTES,
// default 1 MiB). Measured on a 2-core EPYC (AVX512 loops, 1 MiB L2 per core, 32 MiB L3,
// 1 and 2 threads, bench/RESULTS.md): the ResNet-50 set (25.6M fp32, 94% of it in tensors
// of >= 1 MiB) steps in 1.42-1.45x SGD(fused=True) streamed against 1.51-1.63x plain,
// 1x25M in 1.32-1.40x against 1.57-1.66x. A lone tensor stepped and then read back (its
// w the whole working set, cached; one thread) loses 5-20% streamed from 64K to 1M
// elements (e.g. 256K: 111-113 us against 101-103 us) and gains at 2M (1.7-1.9 ms against
// 1.9-5.8 ms): below 1 MiB w stays cached for its next reader; the tensors that dominate
// a large model's step are far over it (8 MiB, where the lone tensor gains, would stream
// only 36% of ResNet-50's parameters).
inline int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("LBK_CPU_STREAM_BYTES");
    return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : int64_t(1) << 20;
  }();
  return bytes;
}

// Whether a write-only output of `numel` elements of T streams.
template <typename T>
bool streams(int64_t numel) {
  if constexpr (kCanStream<T>) {
    return numel * static_cast<int64_t>(sizeof(T)) >= stream_min_bytes();
  } else {
    return false;
  }
}

// Elements of p before the first address aligned to a whole vector (0 when p is aligned),
// at most n; p must be aligned to sizeof(T), as every tensor's data is.
template <typename T>
int64_t stream_head(const T* p, int64_t n) {
  constexpr auto width = static_cast<uintptr_t>(Vectorized<T>::size() * sizeof(T));
  const auto mis = reinterpret_cast<uintptr_t>(p) & (width - 1);
  const int64_t head = mis == 0 ? 0 : static_cast<int64_t>((width - mis) / sizeof(T));
  return head < n ? head : n;
}

// v at p, aligned to the vector width, past the caches.
template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v);
  else _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
#else
  v.store(p);
#endif
}

// The vector part of a pass over n elements that writes the output w: calls
// vec(j, cnt, streamed) over the first nv = n - n % S elements (S the vector width) and
// returns nv, where the caller's scalar loop starts. Plain (`stream` false): whole vectors
// at j = 0, S, 2S, ... Streamed: a partial vector up to w's first aligned address, whole
// vectors whose w `vec` stores with stream_store (streamed = std::true_type), a partial
// vector up to nv. Either way the same elements go through the vector math and the same
// ones through the scalar loop (which may contract products differently), so streaming
// moves only where w's stores go: the results stay bitwise. Forced inline, with `vec`
// (always_inline at its definition): GCC contracts the loops' products into FMAs only
// where it inlines them, and a vector_pass it left out of line changed the bits of 1299
// of 4176 tensors of a 3-step comparison against the loops before streaming.
template <typename T, typename F>
__attribute__((always_inline)) inline int64_t vector_pass(const T* w, int64_t n, bool stream,
                                                         const F& vec) {
  constexpr int64_t S = Vectorized<T>::size();
  const int64_t nv = n - n % S;
  int64_t i = 0;
  if (stream) {
    const int64_t head = stream_head(w, nv);
    if (head > 0) vec(int64_t(0), head, std::false_type{});
    for (i = head; i + S <= nv; i += S) vec(i, S, std::true_type{});
    if (i < nv) vec(i, nv - i, std::false_type{});
    return nv;
  }
  for (; i < nv; i += S) vec(i, S, std::false_type{});
  return nv;
}

// Orders this thread's streaming stores before its later stores (and the end of its
// parallel range): the next op, on any thread, then reads them.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

}  // namespace
}  // namespace lbkernels::cpu::CPU_CAPABILITY
