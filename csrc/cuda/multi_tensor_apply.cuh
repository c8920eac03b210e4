// Multi-tensor launcher: one kernel launch covers many tensors (docs/algorithms.md section 6).
//
// The tensors' addresses and sizes travel in the kernel's argument struct (no device
// table to upload, no host sync), split into 65,536-element chunks, one thread block per
// chunk. The struct holds a bounded number of tensors and blocks so that it stays under
// the 4 KB kernel-parameter limit of every architecture PyTorch builds for; when it fills
// up, the launcher launches and starts over, carrying a half-launched tensor over.
//
// Depends on the CUDA runtime only (no torch headers), so that the compile-only check
// builds it with nvcc on machines whose torch has no CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace lbkernels::cuda {

// Elements per chunk (one block's share): 25.6M parameters are ~400 blocks, enough to
// fill 132 SMs several times; small enough that a tensor's chunks spread over SMs.
constexpr int64_t kChunkSize = 65536;

__host__ __device__ inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Capacity of the argument struct per list depth (pointers per tensor). Per tensor:
// DEPTH addresses + numel + first_chunk (8 bytes each) + index (4) + flag (1), 8 DEPTH + 21
// bytes; per block 5 bytes. Depths 1 to 6 (6: the extrapolated-Adam update) hold 80, 64,
// 48, 40, 36 and 32 tensors: 80 * 29, 64 * 37, 48 * 45, 40 * 53, 36 * 61 and 32 * 69 bytes
// of tensors plus 256 * 5 of blocks are 3600, 3648, 3440, 3400, 3476 and 3488 bytes,
// leaving room for the functor (static_assert below).
template <int DEPTH>
struct MetaCapacity {
  static_assert(DEPTH >= 1 && DEPTH <= 6, "no capacity chosen for this list depth");
  static constexpr int tensors = DEPTH == 1   ? 80
                                 : DEPTH == 2 ? 64
                                 : DEPTH == 3 ? 48
                                 : DEPTH == 4 ? 40
                                 : DEPTH == 5 ? 36
                                              : 32;
  static constexpr int blocks = 256;
};

template <int DEPTH>
struct TensorListMeta {
  static constexpr int kMaxTensors = MetaCapacity<DEPTH>::tensors;
  static constexpr int kMaxBlocks = MetaCapacity<DEPTH>::blocks;
  void* addresses[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_chunk[kMaxTensors];  // call-wide number of the tensor's chunk 0
  int32_t index[kMaxTensors];        // position of the tensor in the op's argument list
  uint8_t flag[kMaxTensors];         // per-tensor flag the functor interprets
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// Host description of one tensor of a launch.
template <int DEPTH>
struct TensorArgs {
  void* addresses[DEPTH];
  int64_t numel;
  int64_t first_chunk;
  int32_t index;
  uint8_t flag;
};

// The kernel: find this block's tensor and chunk, hand them to the functor. The functor
// is inlined and reads `meta` where it lies (parameter space), never a local copy.
template <int DEPTH, typename Functor>
__global__ void multi_tensor_kernel(TensorListMeta<DEPTH> meta, Functor f) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  f(meta, slot, static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]));
}

enum class Blocks {
  kPerChunk,   // one block per chunk of each tensor (empty tensors get none)
  kPerTensor,  // one block per tensor, empty ones included (chunk is always 0)
};

// Launches `f` over `tensors` on `stream`; returns the first launch error.
template <int DEPTH, typename Functor>
cudaError_t multi_tensor_apply(const std::vector<TensorArgs<DEPTH>>& tensors, Blocks blocks,
                               int threads, cudaStream_t stream, const Functor& f) {
  using Meta = TensorListMeta<DEPTH>;
  static_assert(sizeof(Meta) + sizeof(Functor) <= 4096 - 64,
                "kernel arguments exceed the 4 KB parameter limit");
  Meta meta;
  int n_tensors = 0;
  int n_blocks = 0;
  auto launch = [&]() {
    multi_tensor_kernel<DEPTH, Functor><<<n_blocks, threads, 0, stream>>>(meta, f);
    n_blocks = 0;
    return cudaGetLastError();
  };
  for (const TensorArgs<DEPTH>& t : tensors) {
    const int64_t chunks = blocks == Blocks::kPerTensor ? 1 : num_chunks(t.numel);
    if (chunks == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][n_tensors] = t.addresses[d];
    meta.numel[n_tensors] = t.numel;
    meta.first_chunk[n_tensors] = t.first_chunk;
    meta.index[n_tensors] = t.index;
    meta.flag[n_tensors] = t.flag;
    ++n_tensors;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      if (n_blocks < Meta::kMaxBlocks && !(n_tensors == Meta::kMaxTensors && last_chunk)) continue;
      if (const cudaError_t err = launch(); err != cudaSuccess) return err;
      if (last_chunk) {
        n_tensors = 0;
      } else {  // the rest of this tensor's chunks go in the next launch, from slot 0
        const int s = n_tensors - 1;
        for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][s];
        meta.numel[0] = meta.numel[s];
        meta.first_chunk[0] = meta.first_chunk[s];
        meta.index[0] = meta.index[s];
        meta.flag[0] = meta.flag[s];
        n_tensors = 1;
      }
    }
  }
  return n_blocks > 0 ? launch() : cudaSuccess;
}

}  // namespace lbkernels::cuda
