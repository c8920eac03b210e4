// Host-side machinery of the CPU multi-tensor ops: flat views of tensor lists (staged
// through lbkernels/host.h where the loops cannot walk them), chunking, and the
// per-capability kernel table.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <lbkernels/host.h>
#include <lbkernels/cpu_kernels.h>

namespace lbkernels::cpu {

struct KernelTable {
  const char* name;
  decltype(&DEFAULT::sum_squares) sum_squares;
  decltype(&DEFAULT::sgd_update) sgd_update;
  decltype(&DEFAULT::lars_whole) lars_whole;
  decltype(&DEFAULT::average_update) average_update;
  decltype(&DEFAULT::worker_mean) worker_mean;
  decltype(&DEFAULT::extrap_sgd) extrap_sgd;
  decltype(&DEFAULT::extrap_adam) extrap_adam;
  decltype(&DEFAULT::lamb) lamb;
  decltype(&DEFAULT::mean_sum_squares) mean_sum_squares;
};

#define LBK_KERNEL_TABLE(NS) KernelTable{#NS, &NS::sum_squares, &NS::sgd_update, &NS::lars_whole, \
                                        &NS::average_update, &NS::worker_mean, \
                                        &NS::extrap_sgd, &NS::extrap_adam, &NS::lamb, \
                                        &NS::mean_sum_squares}

// The loops built for the best capability this CPU has, as ATen itself decides it
// (so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects ours too).
inline const KernelTable& kernels() {
  static const KernelTable table = [] {
#if defined(LBK_CPU_X86)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return LBK_KERNEL_TABLE(AVX512);
    if (cap == "AVX2") return LBK_KERNEL_TABLE(AVX2);
#endif
    return LBK_KERNEL_TABLE(DEFAULT);
  }();
  return table;
}

// Flat pointers of the tensors `index` of (w, g, buf), staged (lbkernels/host.h) where
// the loops cannot walk them in lock step with w. Parameters and their grads normally
// share strides, so the fast path allocates nothing and copies no tensor handle (a copy
// is an atomic refcount update: two per tensor of a 2000-tensor call). The pointers go
// into `ptrs`, the caller's table (reused across calls: its capacity stays).
class FlatLists {
 public:
  FlatLists(std::vector<TensorPtrs>& ptrs, at::TensorList w, at::TensorList g,
            at::TensorList buf, const std::vector<int64_t>& index)
      : ptrs(ptrs), w_(w) {
    ptrs.clear();
    ptrs.reserve(index.size());
    for (size_t k = 0; k < index.size(); ++k) {
      const int64_t i = index[k];
      const at::Tensor& wi = w[i];
      const at::Tensor& gi = g[i];
      const at::Tensor* bi = buf.empty() ? nullptr : &buf[i];
      if (wi.is_non_overlapping_and_dense() && Staging::walkable_with(gi, wi) &&
          (bi == nullptr || Staging::walkable_with(*bi, wi))) {
        ptrs.push_back(TensorPtrs{wi.data_ptr(), gi.const_data_ptr(),
                                  bi == nullptr ? nullptr : bi->data_ptr(), wi.numel()});
        continue;
      }
      const at::Tensor wv = staging_.lead(wi, true);
      const at::Tensor gv = staging_.follow(gi, wv, false);
      void* bp = bi == nullptr ? nullptr : staging_.follow(*bi, wv, true).data_ptr();
      ptrs.push_back(TensorPtrs{wv.data_ptr(), gv.const_data_ptr(), bp, wv.numel()});
      staged_leads_.emplace_back(k, wv);
    }
  }

  // The averages of lars_sgd_'s folded averaging (TensorPtrs.avg), aligned with `index`
  // as in the constructor, in w's layout and their own dtype.
  void add_averages(at::TensorList avg, const std::vector<int64_t>& index) {
    size_t s = 0;  // the next staged lead (staged_leads_ is in k order)
    for (size_t k = 0; k < index.size(); ++k) {
      const bool staged = s < staged_leads_.size() && staged_leads_[s].first == k;
      const at::Tensor& lead = staged ? staged_leads_[s++].second : w_[index[k]];
      ptrs[k].avg = staging_.follow_as(avg[index[k]], lead, true).data_ptr();
    }
  }

  void write_back() { staging_.write_back(); }

  std::vector<TensorPtrs>& ptrs;

 private:
  at::TensorList w_;
  Staging staging_;
  std::vector<std::pair<size_t, at::Tensor>> staged_leads_;  // (k, walked view) of staged w
};

// The weight of the new snapshot in one averaging update (average_, and lars_sgd_'s folded
// averaging): r = 1 / (n + 1) for SWA (n the count before the call) or 1 - decay for
// EMA, rounded once to each arithmetic type, as the reference computes it.
inline AverageParams average_params(c10::string_view method, const std::optional<at::Tensor>& count,
                                    double decay) {
  if (method != "swa") return {1.0 - decay, static_cast<float>(1.0 - decay)};
  const int64_t n = *count->const_data_ptr<int64_t>();
  return {1.0 / (static_cast<double>(n) + 1.0), 1.f / (static_cast<float>(n) + 1.f)};
}

// The squared norms that the op's norm_sq (a CPU tensor, checked by check_norm_sq) gives
// for argument i of n, into c.given_w2 / c.given_g2, rounded to the arithmetic type (fp64
// for fp64 params, else fp32, as the reference's .to(dtype)); -1 where the entry is < 0.
// Called for LARS tensors only: the entries of excluded ones are never read.
inline void read_given_norms(const std::optional<at::Tensor>& norm_sq, int64_t i, bool fp64,
                             TensorCoefs& c) {
  if (!norm_sq.has_value()) return;
  const int64_t n = norm_sq->size(1);
  auto entry = [&](int64_t row) {
    const double v = norm_sq->scalar_type() == c10::kDouble
                         ? norm_sq->const_data_ptr<double>()[row * n + i]
                         : static_cast<double>(norm_sq->const_data_ptr<float>()[row * n + i]);
    if (!(v >= 0)) return -1.0;
    return fp64 ? v : static_cast<double>(static_cast<float>(v));
  };
  c.given_w2 = entry(0);
  c.given_g2 = entry(1);
}

// Appends the chunks of tensor `t` (position in the flat lists) with `numel` elements.
inline void append_chunks(std::vector<Chunk>& chunks, int64_t t, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({t, b, std::min(numel, b + kChunk)});
}

// The bytes of tensor data one block of large tensors spans (LBK_CPU_BLOCK_BYTES, default
// 8 MiB): the ops that visit a tensor twice (norms, then the update) finish a block while
// it is still in the last-level cache.
inline int64_t block_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("LBK_CPU_BLOCK_BYTES");
    return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : int64_t(8) << 20;
  }();
  return bytes;
}

// The next block of large tensors (more than one chunk) from position k of `ptrs` (any
// type with a `numel`): their chunks, and in `norm_chunks` those of the tensors that
// need norms (`excluded(j)` false), until the block spans block_bytes() at
// `bytes_per_element`. Returns the end of the block.
template <typename Ptrs, typename Excluded>
int64_t next_block(const std::vector<Ptrs>& ptrs, int64_t k, int64_t bytes_per_element,
                   const Excluded& excluded, std::vector<Chunk>& chunks,
                   std::vector<Chunk>& norm_chunks) {
  chunks.clear();
  norm_chunks.clear();
  const int64_t n = static_cast<int64_t>(ptrs.size());
  int64_t bytes = 0;
  for (; k < n && (bytes == 0 || bytes < block_bytes()); ++k) {
    const int64_t numel = ptrs[k].numel;
    if (numel <= kChunk) continue;
    append_chunks(chunks, k, numel);
    if (!excluded(k)) append_chunks(norm_chunks, k, numel);
    bytes += bytes_per_element * numel;
  }
  return k;
}

// Runs f(c0, c1) over [0, n) chunks on the intra-op thread pool.
template <typename F>
inline void parallel_chunks(int64_t n, const F& f) {
  if (n > 0) at::parallel_for(0, n, 1, f);
}

}  // namespace lbkernels::cpu
