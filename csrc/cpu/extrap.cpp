// CPU kernels of extrap_sgd_ and extrap_adam_ (docs/algorithms.md sections 2, 2.1, 2.2).
//
// Memory-bound like lars_sgd_ (past_grad reads x, buf, g, gk and writes x, buf, w: 28 bytes
// per fp32 parameter), so the same plan (lars.cpp):
//  * one parallel region over every chunk of every tensor of a dtype: tensors of at most
//    one chunk (64K elements) whole, larger ones in 64K chunks (row-aligned for the filter
//    variant, whose chunks hold whole output filters);
//  * with LARS, a tensor of one chunk gets its norms, ratio and update in one visit; the
//    norms of larger tensors are summed in that same region and their update chunks run
//    in a second one;
//  * a norm given by norm_sq (>= 0) is not summed; a large tensor with both given gets its
//    ratio on the host and its update in the first region;
//  * the scalars (lr, extrap_lr, grad_scale, found_inf, Adam's step counters) are CPU
//    tensors read on the host, which costs no device synchronisation here.
// Tensors the loops cannot walk in lock step with params (other strides, not dense) are
// staged through a temporary and copied back, as lars_sgd_ does; the noise variants walk
// row-major order (philox.h numbers elements row-major), so they stage every tensor that
// is not contiguous.
#include <torch/library.h>

#include <cmath>

#include <lbkernels/extrap_args.h>

#include "multi_tensor.h"

namespace lbkernels::cpu {
namespace {

// Flat pointers of the tensors `index` of one dtype group (ExtrapPtrs), staged where the
// loops cannot walk them in the layout of w (row-major when `row_major`).
std::vector<ExtrapPtrs> extrap_ptrs(Staging& staging, const std::vector<int64_t>& index,
                                    at::TensorList w, at::TensorList x, at::TensorList s1,
                                    at::TensorList s2, at::TensorList g, at::TensorList gk,
                                    bool row_major) {
  std::vector<ExtrapPtrs> ptrs;
  ptrs.reserve(index.size());
  for (int64_t i : index) {
    const at::Tensor wv = staging.lead(w[i], true, row_major);
    ExtrapPtrs p{};
    p.w = wv.data_ptr();
    p.x = staging.follow(x[i], wv, true).data_ptr();
    p.s1 = s1.empty() ? nullptr : staging.follow(s1[i], wv, true).data_ptr();
    p.s2 = s2.empty() ? nullptr : staging.follow(s2[i], wv, true).data_ptr();
    p.g = staging.follow(g[i], wv, false).const_data_ptr();
    p.gk = gk.empty() ? nullptr : staging.follow(gk[i], wv, false).const_data_ptr();
    p.numel = wv.numel();
    p.row = wv.dim() >= 2 && wv.size(0) > 0 ? p.numel / wv.size(0) : p.numel;
    p.index = static_cast<uint32_t>(i);
    ptrs.push_back(p);
  }
  return ptrs;
}

// The value of an optional one-element tensor, read on the host (a CPU tensor: no sync).
double value_or(const std::optional<at::Tensor>& t, double fallback) {
  return t.has_value() ? t->item<double>() : fallback;
}

// Chunks of tensor k: 64K elements, or whole filters of about that size.
void append_extrap_chunks(std::vector<Chunk>& chunks, int64_t k, const ExtrapPtrs& p,
                          bool filters) {
  if (!filters) return append_chunks(chunks, k, p.numel);
  const int64_t step = std::max<int64_t>(1, kChunk / p.row) * p.row;
  for (int64_t b = 0; b < p.numel; b += step) chunks.push_back({k, b, std::min(p.numel, b + step)});
}

void extrap_sgd_cpu(const ExtrapSgdArgs& a) {
  if (value_or(a.found_inf, 0.0) != 0.0) return;
  const bool has_momentum = a.has_momentum();
  const Extrapolation kind = a.mode;
  ExtrapParams ep;
  const double lr_v = value_or(a.lr_tensor, a.lr);
  ep.extrap_lr = value_or(a.extrap_lr_tensor, a.extrap_lr);
  ep.sgd.has_scale = a.grad_scale.has_value();
  ep.sgd.grad_scale = value_or(a.grad_scale, 1.0);

  ep.sgd.momentum = a.momentum;
  ep.sgd.has_momentum = has_momentum;
  ep.sgd.nesterov = a.nesterov;
  ep.kind = kind;
  ep.noise_scale = a.noise_scale;
  ep.seed = static_cast<uint64_t>(a.seed);
  ep.offset = static_cast<uint64_t>(a.offset);
  ep.has_local = !a.local_grads.empty();
  const LarsParams lp{lr_v, a.weight_decay, a.trust_coefficient, a.eps, a.clip, true, false};
  const auto& K = kernels();
  const bool filters = kind == Extrapolation::kFilter;
  const at::TensorList bufs = has_momentum ? a.momentum_buffers : at::TensorList();

  for (const auto& [dtype, index] : group_by_dtype(a.params)) {
    Staging staging;
    const std::vector<ExtrapPtrs> ptrs =
        extrap_ptrs(staging, index, a.params, a.anchors, bufs, {}, a.grads, a.local_grads,
                    kind != Extrapolation::kPastGrad);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<TensorCoefs> coefs(n);
    // Jobs of the first region: whole tensors, then (LARS) the norm chunks of large ones
    // or (no LARS) their update chunks; `chunks` holds the update chunks of large tensors.
    std::vector<Chunk> jobs, chunks;
    std::vector<TensorPtrs> norm_ptrs(n);
    bool large_lars = false;
    for (int64_t k = 0; k < n; ++k) {
      const ExtrapPtrs& p = ptrs[k];
      coefs[k].excluded = !a.lars || a.exclude.get(index[k]);
      lars_coefs(0, 0, lp, ep.sgd, coefs[k]);  // r = 1 until the norms are known
      if (!coefs[k].excluded)
        read_given_norms(a.norm_sq, index[k], dtype == c10::kDouble, coefs[k]);
      // A norm given by norm_sq is not summed: null, not read for it.
      norm_ptrs[k] = TensorPtrs{coefs[k].given_w2 < 0 ? p.x : nullptr,
                                coefs[k].given_g2 < 0 ? p.g : nullptr, nullptr, p.numel};
      if (p.numel == 0) continue;
      if (p.numel <= kChunk) {
        jobs.push_back({k, 0, p.numel});
      } else {
        append_extrap_chunks(chunks, k, p, filters);
        if (coefs[k].needs_norms()) {
          large_lars = true;
        } else if (!coefs[k].excluded) {
          lars_coefs(0, 0, lp, ep.sgd, coefs[k]);  // both norms given: the ratio now
        }
      }
    }
    const int64_t n_whole = static_cast<int64_t>(jobs.size());
    if (large_lars) {
      for (int64_t k = 0; k < n; ++k)
        if (ptrs[k].numel > kChunk && coefs[k].needs_norms())
          append_chunks(jobs, k, ptrs[k].numel);
    } else {
      jobs.insert(jobs.end(), chunks.begin(), chunks.end());
      chunks.clear();
    }
    std::vector<double> partial(2 * (jobs.size() - n_whole));
    parallel_chunks(static_cast<int64_t>(jobs.size()), [&](int64_t c0, int64_t c1) {
      const int64_t w1 = std::min(c1, n_whole);
      if (c0 < w1) K.extrap_sgd(dtype, ptrs.data(), jobs.data(), c0, w1, coefs.data(), lp, ep, true);
      const int64_t r0 = std::max(c0, n_whole);
      if (r0 >= c1) return;
      if (large_lars) {
        K.sum_squares(dtype, norm_ptrs.data(), jobs.data() + n_whole, r0 - n_whole, c1 - n_whole,
                      partial.data());
      } else {
        K.extrap_sgd(dtype, ptrs.data(), jobs.data(), r0, c1, coefs.data(), lp, ep, false);
      }
    });
    if (large_lars) {
      std::vector<double> sum_x2(n), sum_g2(n);
      for (size_t c = n_whole; c < jobs.size(); ++c) {
        sum_x2[jobs[c].tensor] += partial[2 * (c - n_whole)];
        sum_g2[jobs[c].tensor] += partial[2 * (c - n_whole) + 1];
      }
      for (int64_t k = 0; k < n; ++k)
        if (ptrs[k].numel > kChunk && coefs[k].needs_norms())
          lars_coefs(sum_x2[k], sum_g2[k], lp, ep.sgd, coefs[k]);
      parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
        K.extrap_sgd(dtype, ptrs.data(), chunks.data(), c0, c1, coefs.data(), lp, ep, false);
      });
    }
    staging.write_back();
  }
}

void extrap_adam_cpu(const ExtrapAdamArgs& a) {
  if (value_or(a.found_inf, 0.0) != 0.0) return;
  AdamParams ap;
  const double lr_v = value_or(a.lr_tensor, a.lr);
  ap.extrap_lr = value_or(a.extrap_lr_tensor, a.extrap_lr);
  ap.has_scale = a.grad_scale.has_value();
  ap.grad_scale = value_or(a.grad_scale, 1.0);

  ap.weight_decay = a.weight_decay;
  ap.decay = 1.0 - lr_v * a.weight_decay;
  ap.beta1 = a.beta1;
  ap.beta2 = a.beta2;
  ap.eps = a.eps;
  ap.decoupled = a.decoupled_weight_decay;
  ap.has_local = !a.local_grads.empty();
  const auto& K = kernels();

  for (const auto& [dtype, index] : group_by_dtype(a.params)) {
    Staging staging;
    const std::vector<ExtrapPtrs> ptrs = extrap_ptrs(staging, index, a.params, a.anchors,
                                                     a.exp_avgs, a.exp_avg_sqs, a.grads,
                                                     a.local_grads, false);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<AdamTensorCoefs> coefs(n);
    std::vector<Chunk> chunks;
    for (int64_t k = 0; k < n; ++k) {
      // The counter is incremented in fp32 and read as a double, as torch.optim.Adam does.
      const double t = static_cast<double>(*a.steps[index[k]].const_data_ptr<float>() + 1.f);
      coefs[k].step_size = lr_v / (1.0 - std::pow(a.beta1, t));
      coefs[k].bc2_sqrt = std::sqrt(1.0 - std::pow(a.beta2, t));
      append_chunks(chunks, k, ptrs[k].numel);
    }
    parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
      K.extrap_adam(dtype, ptrs.data(), chunks.data(), c0, c1, coefs.data(), ap);
    });
    staging.write_back();
  }
  for (const at::Tensor& s : a.steps) *s.mutable_data_ptr<float>() += 1.f;
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("extrap_sgd_", &extrap_sgd_op<extrap_sgd_cpu, c10::DeviceType::CPU>);
  m.impl("extrap_adam_", &extrap_adam_op<extrap_adam_cpu, c10::DeviceType::CPU>);
}

}  // namespace lbkernels::cpu
