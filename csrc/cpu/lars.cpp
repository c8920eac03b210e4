// CPU kernels of multi_tensor_l2norm and lars_sgd_ (docs/algorithms.md sections 1 and 6);
// the arguments are checked by lbkernels/lars_args.h before lars_sgd_cpu runs.
//
// Where the time goes: the step is memory-bound (LARS reads w, g, buf and writes w, buf:
// 20 bytes per fp32 parameter, plus the norm pass over w and g). So
//  * tensors of at most one chunk (64K elements) are handled whole by one thread: norms,
//    ratio and update in one visit, the second read hitting L1/L2. On 2000 tensors of
//    1000 elements this is one parallel region for the whole model;
//  * larger tensors go in blocks of about LBK_CPU_BLOCK_BYTES of w+g: one parallel sweep
//    of per-chunk sums of squares, a serial reduction per tensor, one parallel update
//    sweep while the block is still in the last-level cache;
//  * nothing proportional to the model is allocated: the chunk table is 24 bytes per 64K
//    elements, and the norms never leave these loops.
//  * a norm given by norm_sq (>= 0) is not summed: that tensor is not read for it (a
//    tensor with both norms given is read once, by its update);
//  * with the norm cache (w_norm_sq, w_norm_key) the update sums the squares of the new w
//    as it writes them, so the next call reads w for its norm only if w changed since
//    (fp32 with momentum: 24 bytes per parameter instead of 28; docs/algorithms.md
//    section 1).
#include <torch/library.h>

#include <lbkernels/lars_args.h>

#include "multi_tensor.h"

namespace lbkernels::cpu {

const char* capability_name() { return kernels().name; }

namespace {

// Writes into out (checked first): the step of an optimizer that keeps out allocates nothing.
void multi_tensor_l2norm_out_cpu(at::TensorList xs, at::Tensor out) {
  check_list(xs, "xs", c10::DeviceType::CPU);
  check_l2norm_out(xs, out);
  const int64_t n = static_cast<int64_t>(xs.size());
  std::vector<double> sums(static_cast<size_t>(n), 0.0);
  for (const auto& [dtype, index] : group_by_dtype(xs)) {
    Staging staging;
    std::vector<TensorPtrs> ptrs;
    std::vector<Chunk> chunks;
    for (int64_t k = 0; k < static_cast<int64_t>(index.size()); ++k) {
      const at::Tensor& x = xs[index[k]];
      ptrs.push_back({staging.lead(x, false).data_ptr(), nullptr, nullptr, x.numel()});
      append_chunks(chunks, k, x.numel());
    }
    std::vector<double> partial(2 * chunks.size());
    const auto& K = kernels();
    parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
      K.sum_squares(dtype, ptrs.data(), chunks.data(), c0, c1, partial.data());
    });
    for (size_t c = 0; c < chunks.size(); ++c) sums[index[chunks[c].tensor]] += partial[2 * c];
  }
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(std::sqrt(sums[i]));
  bump_version(out);
}

at::Tensor multi_tensor_l2norm_cpu(at::TensorList xs) {
  at::Tensor out =
      at::empty({static_cast<int64_t>(xs.size())}, at::TensorOptions().dtype(at::kFloat));
  multi_tensor_l2norm_out_cpu(xs, out);
  return out;
}

// The per-call tables of lars_sgd_cpu, one set per thread, reused: their capacity stays,
// so a step allocates none of them (2000 tensors need ~300 KiB: 56 B of TensorCoefs,
// 40 B of TensorPtrs, 24 B of Chunk and 4 doubles per tensor, each table above glibc's
// mmap threshold when MALLOC_MMAP_THRESHOLD_=65536, i.e. a fresh mapping and its page
// faults every call). They hold raw pointers and numbers only, never a tensor.
struct LarsTables {
  std::vector<TensorPtrs> ptrs, norm_ptrs;
  std::vector<TensorCoefs> coefs;
  std::vector<Chunk> whole, chunks, norm_chunks;
  std::vector<double> whole_w2, partial, sum_w2, sum_g2, chunk_w2, new_w2;
};

void lars_sgd_cpu(const LarsSgdArgs& a) {
  if (a.found_inf.has_value() && a.found_inf->item<double>() != 0.0) return;
  const bool has_momentum = a.has_momentum();
  const double lr_v = a.lr_tensor.has_value() ? a.lr_tensor->item<double>() : a.lr;
  SgdParams sp;
  sp.has_scale = a.grad_scale.has_value();
  if (sp.has_scale) sp.grad_scale = a.grad_scale->item<double>();

  // Folded averaging: the weight of the new snapshot as average_ computes it.
  const bool averaging = !a.averages.empty();
  if (averaging) {
    const AverageParams r = average_params(a.average_method, a.average_count, a.average_decay);
    sp.average_r64 = r.r64;
    sp.average_r32 = r.r32;
  }
  sp.momentum = a.momentum;
  sp.dampening = a.dampening;
  sp.has_momentum = has_momentum;
  sp.nesterov = a.nesterov;
  const LarsParams lp{lr_v, a.weight_decay, a.trust_coefficient, a.eps, a.clip,
                      a.zero_norm_decay, a.paper()};
  const auto& K = kernels();
  const at::TensorList bufs = has_momentum ? a.momentum_buffers : at::TensorList();

  // The norm cache: a matching entry gives ||w||^2 (exact: it is the double this pass
  // would sum); every adapted tensor's update sums its new w for the next call.
  const bool cache = a.w_norm_sq.has_value();
  double* cache_out = cache ? a.w_norm_sq->mutable_data_ptr<double>() : nullptr;
  auto store_w2 = [&](int64_t i, double v) {
    cache_out[i] = v;
    mark_w_norm_written(a, i);
  };

  thread_local LarsTables t;
  for (const auto& [dtype, index] : group_by_dtype(a.params)) {
    FlatLists flat(t.ptrs, a.params, a.grads, bufs, index);
    if (averaging) flat.add_averages(a.averages, index);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<TensorCoefs>& coefs = t.coefs;
    coefs.assign(n, TensorCoefs{});
    std::vector<Chunk>&whole = t.whole, &chunks = t.chunks, &norm_chunks = t.norm_chunks;
    whole.clear();
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = index[k];
      coefs[k].excluded = a.exclude.get(i);
      if (!coefs[k].excluded) {
        read_given_norms(a.norm_sq, i, dtype == c10::kDouble, coefs[k]);
        if (cache && coefs[k].given_w2 < 0) coefs[k].given_w2 = cached_w_norm_sq(a, i);
      }
      coefs[k].first = has_momentum && !a.steps.empty() && *a.steps[i].const_data_ptr<float>() == 0.f;
      if (flat.ptrs[k].numel <= kChunk) whole.push_back({k, 0, flat.ptrs[k].numel});
    }
    // Small tensors: one region, each tensor visited once by one thread.
    std::vector<double>& whole_w2 = t.whole_w2;
    whole_w2.assign(cache ? whole.size() : 0, 0.0);
    double* whole_out = cache ? whole_w2.data() : nullptr;
    parallel_chunks(static_cast<int64_t>(whole.size()), [&](int64_t c0, int64_t c1) {
      K.lars_whole(dtype, flat.ptrs.data(), whole.data(), c0, c1, coefs.data(), lp, sp, whole_out);
    });
    for (size_t c = 0; c < whole_w2.size(); ++c)
      if (!coefs[whole[c].tensor].excluded) store_w2(index[whole[c].tensor], whole_w2[c]);
    // Large tensors: blocks that fit the last-level cache, two sweeps each.
    const int64_t elem = c10::elementSize(dtype);
    std::vector<double>&partial = t.partial, &sum_w2 = t.sum_w2, &sum_g2 = t.sum_g2,
                        &chunk_w2 = t.chunk_w2, &new_w2 = t.new_w2;
    sum_w2.assign(n, 0.0);
    sum_g2.assign(n, 0.0);
    new_w2.assign(cache ? n : 0, 0.0);
    chunk_w2.clear();
    // The norm pass's view, made when a block first needs it (never for small tensors
    // only): w or g null where norm_sq or the cache gives that norm (not read for it).
    const bool some_given = a.norm_sq.has_value() || cache;
    const TensorPtrs* norm_view = nullptr;
    int64_t k = 0;
    while (k < n) {
      // A tensor whose norms are both given (norm_sq, cache) or not needed gets no norm chunks.
      const int64_t k_end = next_block(flat.ptrs, k, 2 * elem,
                                       [&](int64_t j) { return !coefs[j].needs_norms(); }, chunks,
                                       norm_chunks);
      if (!norm_chunks.empty() && norm_view == nullptr) {
        if (some_given) {
          t.norm_ptrs.assign(flat.ptrs.begin(), flat.ptrs.end());
          for (int64_t j = 0; j < n; ++j) {
            if (coefs[j].given_w2 >= 0) t.norm_ptrs[j].w = nullptr;
            if (coefs[j].given_g2 >= 0) t.norm_ptrs[j].g = nullptr;
          }
        }
        norm_view = some_given ? t.norm_ptrs.data() : flat.ptrs.data();
      }
      if (!norm_chunks.empty()) {
        partial.assign(2 * norm_chunks.size(), 0.0);
        parallel_chunks(static_cast<int64_t>(norm_chunks.size()), [&](int64_t c0, int64_t c1) {
          K.sum_squares(dtype, norm_view, norm_chunks.data(), c0, c1, partial.data());
        });
        for (size_t c = 0; c < norm_chunks.size(); ++c) {
          sum_w2[norm_chunks[c].tensor] += partial[2 * c];
          sum_g2[norm_chunks[c].tensor] += partial[2 * c + 1];
        }
      }
      for (int64_t j = k; j < k_end; ++j)
        if (flat.ptrs[j].numel > kChunk) lars_coefs(sum_w2[j], sum_g2[j], lp, sp, coefs[j]);
      if (cache) chunk_w2.assign(chunks.size(), 0.0);
      double* chunk_out = cache ? chunk_w2.data() : nullptr;
      parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
        K.sgd_update(dtype, flat.ptrs.data(), chunks.data(), c0, c1, coefs.data(), sp, chunk_out);
      });
      // The chunks' sums added in chunk order from 0, as the norm pass adds them above.
      for (size_t c = 0; c < chunk_w2.size(); ++c) new_w2[chunks[c].tensor] += chunk_w2[c];
      for (int64_t j = k; j < k_end; ++j)
        if (cache && flat.ptrs[j].numel > kChunk && !coefs[j].excluded) store_w2(index[j], new_w2[j]);
      k = k_end;
    }
    flat.write_back();
  }
  if (has_momentum)
    for (const at::Tensor& s : a.steps) *s.mutable_data_ptr<float>() += 1.f;
  if (averaging && a.average_count.has_value()) *a.average_count->mutable_data_ptr<int64_t>() += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cpu);
  m.impl("multi_tensor_l2norm.out", &multi_tensor_l2norm_out_cpu);
  m.impl("lars_sgd_", &lars_sgd_op<lars_sgd_cpu, c10::DeviceType::CPU>);
}

}  // namespace lbkernels::cpu
