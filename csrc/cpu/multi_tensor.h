// Host-side machinery of the CPU multi-tensor ops: flat views
// of tensor lists (with a copy-in/copy-out fallback for layouts the loops cannot walk),
// chunking, and the per-capability kernel table.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

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
};

#define LBK_KERNEL_TABLE(NS) KernelTable{#NS, &NS::sum_squares, &NS::sgd_update, &NS::lars_whole, \
                                        &NS::average_update, &NS::worker_mean, \
                                        &NS::extrap_sgd, &NS::extrap_adam}

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

inline double scalar_value(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK_VALUE(t->numel() == 1, name, " must hold exactly one element");
  return t->item<double>();
}

// Flat pointers of the tensors `index` of (w, g, buf). A tensor whose memory the loops
// cannot walk in lock step with w (not dense, or strides unlike w's) is replaced by a
// temporary in w's layout (or contiguous) and copied back by write_back(). Parameters
// and their grads normally share strides, so the fast path allocates nothing.
class FlatLists {
 public:
  FlatLists(at::TensorList w, at::TensorList g, at::TensorList buf,
            const std::vector<int64_t>& index) {
    ptrs.reserve(index.size());
    for (int64_t i : index) {
      const at::Tensor& wi = w[i];
      const bool w_ok = wi.is_non_overlapping_and_dense();
      const at::Tensor wv = w_ok ? wi : stage(wi, wi.contiguous(), true);
      const at::Tensor gv = walkable(g[i], wv) ? g[i] : stage(g[i], like(wv, g[i]), false);
      void* bp = nullptr;
      if (!buf.empty()) {
        const at::Tensor& bi = buf[i];
        bp = (walkable(bi, wv) ? bi : stage(bi, like(wv, bi), true)).data_ptr();
      }
      ptrs.push_back(TensorPtrs{wv.data_ptr(), gv.const_data_ptr(), bp, wi.numel()});
      leads_.push_back(wv);
    }
  }

  // The averages of lars_sgd_'s folded averaging (TensorPtrs.avg), aligned with `index`
  // as in the constructor; staged like buf when their layout differs from w's.
  void add_averages(at::TensorList avg, const std::vector<int64_t>& index) {
    for (size_t k = 0; k < index.size(); ++k) {
      const at::Tensor& a = avg[index[k]];
      const at::Tensor& wv = leads_[k];
      ptrs[k].avg = walkable(a, wv) ? a.data_ptr()
                                    : stage(a, at::empty_like(wv, a.options()).copy_(a), true).data_ptr();
    }
  }

  void write_back() {
    for (auto& [dst, tmp] : pending_) dst.copy_(tmp);
  }

  std::vector<TensorPtrs> ptrs;

 private:
  static bool walkable(const at::Tensor& x, const at::Tensor& w) {
    return x.is_non_overlapping_and_dense() && x.strides() == w.strides();
  }
  static at::Tensor like(const at::Tensor& layout, const at::Tensor& values) {
    return at::empty_like(layout).copy_(values);
  }
  at::Tensor stage(const at::Tensor& orig, at::Tensor tmp, bool written) {
    if (written) pending_.emplace_back(orig, tmp);
    keep_.push_back(tmp);
    return tmp;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
  std::vector<at::Tensor> keep_;
  std::vector<at::Tensor> leads_;  // the walked view of each w
};

// Appends the chunks of tensor `t` (position in the flat lists) with `numel` elements.
inline void append_chunks(std::vector<Chunk>& chunks, int64_t t, int64_t numel) {
  for (int64_t b = 0; b < numel; b += kChunk) chunks.push_back({t, b, std::min(numel, b + kChunk)});
}

// Runs f(c0, c1) over [0, n) chunks on the intra-op thread pool.
template <typename F>
inline void parallel_chunks(int64_t n, const F& f) {
  if (n > 0) at::parallel_for(0, n, 1, f);
}

}  // namespace lbkernels::cpu
