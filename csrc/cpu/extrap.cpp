// CPU kernels of extrap_sgd_ and extrap_adam_ (ALGORITHMS.md sections 2, 2.1, 2.2).
//
// Memory-bound like lars_sgd_ (past_grad reads x, buf, g, gk and writes x, buf, w: 28 bytes
// per fp32 parameter), so the same plan (lars.cpp):
//  * one parallel region over every chunk of every tensor of a dtype: tensors of at most
//    one chunk (64K elements) whole, larger ones in 64K chunks (row-aligned for the filter
//    variant, whose chunks hold whole output filters);
//  * with LARS, a tensor of one chunk gets its norms, ratio and update in one visit; the
//    norms of larger tensors are summed in that same region and their update chunks run
//    in a second one;
//  * the scalars (lr, extrap_lr, grad_scale, found_inf, Adam's step counters) are CPU
//    tensors read on the host, which costs no device synchronisation here.
// Tensors the loops cannot walk in lock step with params (other strides, not dense) are
// staged through a temporary and copied back, as lars_sgd_ does; the noise variants walk
// row-major order (philox.h numbers elements row-major), so they stage every tensor that
// is not contiguous.
#include <torch/library.h>

#include <cmath>

#include "multi_tensor.h"

namespace lbkernels::cpu {
namespace {

Extrapolation parse_extrapolation(c10::string_view s) {
  if (s == "past_grad") return Extrapolation::PastGrad;
  if (s == "gaussian") return Extrapolation::Gaussian;
  if (s == "uniform") return Extrapolation::Uniform;
  if (s == "weight") return Extrapolation::Weight;
  if (s == "filter") return Extrapolation::Filter;
  TORCH_CHECK_VALUE(false, "extrapolation must be one of ('past_grad', 'gaussian', 'uniform', "
                    "'weight', 'filter'), got '", s, "'");
}

void check_nonnegative(double v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0.0, name, " must be >= 0, got ", v);  // also rejects NaN
}

void check_optional_aligned(at::TensorList params, at::TensorList xs, const char* name) {
  TORCH_CHECK_VALUE(xs.empty() || xs.size() == params.size(), name, " has ", xs.size(),
                    " entries but params has ", params.size(), " (or pass none)");
  if (!xs.empty()) check_aligned(params, xs, name);
}

double optional_scalar(const std::optional<at::Tensor>& t, const char* name, double fallback) {
  return t.has_value() ? scalar_value(t, name) : fallback;
}

// Flat pointers of the tensors `index` of one dtype group (ExtrapPtrs), staging what the
// loops cannot walk in the layout of w (row-major when `row_major`).
class ExtrapLists {
 public:
  ExtrapLists(const std::vector<int64_t>& index, at::TensorList w, at::TensorList x,
              at::TensorList s1, at::TensorList s2, at::TensorList g, at::TensorList gk,
              bool row_major) {
    ptrs.reserve(index.size());
    for (int64_t i : index) {
      const at::Tensor& wi = w[i];
      const bool w_ok = row_major ? wi.is_contiguous() : wi.is_non_overlapping_and_dense();
      const at::Tensor wv = w_ok ? wi : stage(wi, wi.contiguous(), true);
      ExtrapPtrs p{};
      p.w = wv.data_ptr();
      p.x = in_layout(x[i], wv, true).data_ptr();
      p.s1 = s1.empty() ? nullptr : in_layout(s1[i], wv, true).data_ptr();
      p.s2 = s2.empty() ? nullptr : in_layout(s2[i], wv, true).data_ptr();
      p.g = in_layout(g[i], wv, false).const_data_ptr();
      p.gk = gk.empty() ? nullptr : in_layout(gk[i], wv, false).const_data_ptr();
      p.numel = wi.numel();
      p.row = wi.dim() >= 2 && wi.size(0) > 0 ? p.numel / wi.size(0) : p.numel;
      p.index = static_cast<uint32_t>(i);
      ptrs.push_back(p);
    }
  }

  void write_back() {
    for (auto& [dst, tmp] : pending_) dst.copy_(tmp);
  }

  std::vector<ExtrapPtrs> ptrs;

 private:
  at::Tensor in_layout(const at::Tensor& t, const at::Tensor& layout, bool written) {
    if (t.is_non_overlapping_and_dense() && t.strides() == layout.strides()) return t;
    return stage(t, at::empty_like(layout).copy_(t), written);
  }
  at::Tensor stage(const at::Tensor& orig, at::Tensor tmp, bool written) {
    if (written) pending_.emplace_back(orig, tmp);
    keep_.push_back(tmp);
    return tmp;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
  std::vector<at::Tensor> keep_;
};

// Chunks of tensor k: 64K elements, or whole filters of about that size.
void append_extrap_chunks(std::vector<Chunk>& chunks, int64_t k, const ExtrapPtrs& p,
                          bool filters) {
  if (!filters) return append_chunks(chunks, k, p.numel);
  const int64_t step = std::max<int64_t>(1, kChunk / p.row) * p.row;
  for (int64_t b = 0; b < p.numel; b += step) chunks.push_back({k, b, std::min(p.numel, b + step)});
}

void extrap_sgd_cpu(at::TensorList params, at::TensorList anchors,
                    at::TensorList momentum_buffers, at::TensorList grads,
                    at::TensorList local_grads, const c10::List<bool>& exclude, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                    const std::optional<at::Tensor>& extrap_lr_tensor, double momentum,
                    double weight_decay, bool nesterov, bool lars, double trust_coefficient,
                    double eps, bool clip, c10::string_view extrapolation, double noise_scale,
                    int64_t seed, int64_t offset, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  // -- every check before the first write
  check_list(params, "params", c10::DeviceType::CPU);
  check_aligned(params, anchors, "anchors");
  check_aligned(params, grads, "grads");
  check_optional_aligned(params, local_grads, "local_grads");
  TORCH_CHECK_VALUE(exclude.size() == params.size(), "exclude has ", exclude.size(),
                    " entries but params has ", params.size());
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_aligned(params, momentum_buffers, "momentum_buffers");
  const Extrapolation kind = parse_extrapolation(extrapolation);
  check_nonnegative(lr, "lr");
  check_nonnegative(extrap_lr, "extrap_lr");
  check_nonnegative(momentum, "momentum");
  check_nonnegative(weight_decay, "weight_decay");
  check_nonnegative(noise_scale, "noise_scale");
  check_nonnegative(static_cast<double>(offset), "offset");
  ExtrapParams ep;
  const double lr_v = optional_scalar(lr_tensor, "lr_tensor", lr);
  ep.extrap_lr = optional_scalar(extrap_lr_tensor, "extrap_lr_tensor", extrap_lr);
  ep.sgd.has_scale = grad_scale.has_value();
  ep.sgd.grad_scale = optional_scalar(grad_scale, "grad_scale", 1.0);
  if (optional_scalar(found_inf, "found_inf", 0.0) != 0.0) return;

  ep.sgd.momentum = momentum;
  ep.sgd.has_momentum = has_momentum;
  ep.sgd.nesterov = nesterov;
  ep.kind = kind;
  ep.noise_scale = noise_scale;
  ep.seed = static_cast<uint64_t>(seed);
  ep.offset = static_cast<uint64_t>(offset);
  ep.has_local = !local_grads.empty();
  const LarsParams lp{lr_v, weight_decay, trust_coefficient, eps, clip, true, false};
  const auto& K = kernels();
  const bool filters = kind == Extrapolation::Filter;
  const at::TensorList bufs = has_momentum ? momentum_buffers : at::TensorList();

  for (const auto& [dtype, index] : group_by_dtype(params)) {
    ExtrapLists flat(index, params, anchors, bufs, {}, grads, local_grads,
                     kind != Extrapolation::PastGrad);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<TensorCoefs> coefs(n);
    // Jobs of the first region: whole tensors, then (LARS) the norm chunks of large ones
    // or (no LARS) their update chunks; `chunks` holds the update chunks of large tensors.
    std::vector<Chunk> jobs, chunks;
    std::vector<TensorPtrs> norm_ptrs(n);
    bool large_lars = false;
    for (int64_t k = 0; k < n; ++k) {
      const ExtrapPtrs& p = flat.ptrs[k];
      coefs[k].excluded = !lars || exclude.get(index[k]);
      lars_coefs(0, 0, lp, ep.sgd, coefs[k]);  // r = 1 until the norms are known
      norm_ptrs[k] = TensorPtrs{p.x, p.g, nullptr, p.numel};
      if (p.numel == 0) continue;
      if (p.numel <= kChunk) {
        jobs.push_back({k, 0, p.numel});
      } else {
        append_extrap_chunks(chunks, k, p, filters);
        large_lars = large_lars || !coefs[k].excluded;
      }
    }
    const int64_t n_whole = static_cast<int64_t>(jobs.size());
    if (large_lars) {
      for (int64_t k = 0; k < n; ++k)
        if (flat.ptrs[k].numel > kChunk && !coefs[k].excluded)
          append_chunks(jobs, k, flat.ptrs[k].numel);
    } else {
      jobs.insert(jobs.end(), chunks.begin(), chunks.end());
      chunks.clear();
    }
    std::vector<double> partial(2 * (jobs.size() - n_whole));
    parallel_chunks(static_cast<int64_t>(jobs.size()), [&](int64_t c0, int64_t c1) {
      const int64_t w1 = std::min(c1, n_whole);
      if (c0 < w1) K.extrap_sgd(dtype, flat.ptrs.data(), jobs.data(), c0, w1, coefs.data(), lp, ep, true);
      const int64_t r0 = std::max(c0, n_whole);
      if (r0 >= c1) return;
      if (large_lars) {
        K.sum_squares(dtype, norm_ptrs.data(), jobs.data() + n_whole, r0 - n_whole, c1 - n_whole,
                      partial.data());
      } else {
        K.extrap_sgd(dtype, flat.ptrs.data(), jobs.data(), r0, c1, coefs.data(), lp, ep, false);
      }
    });
    if (large_lars) {
      std::vector<double> sum_x2(n), sum_g2(n);
      for (size_t c = n_whole; c < jobs.size(); ++c) {
        sum_x2[jobs[c].tensor] += partial[2 * (c - n_whole)];
        sum_g2[jobs[c].tensor] += partial[2 * (c - n_whole) + 1];
      }
      for (int64_t k = 0; k < n; ++k)
        if (flat.ptrs[k].numel > kChunk && !coefs[k].excluded)
          lars_coefs(sum_x2[k], sum_g2[k], lp, ep.sgd, coefs[k]);
      parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
        K.extrap_sgd(dtype, flat.ptrs.data(), chunks.data(), c0, c1, coefs.data(), lp, ep, false);
      });
    }
    flat.write_back();
  }
}

void extrap_adam_cpu(at::TensorList params, at::TensorList anchors, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList grads,
                     at::TensorList local_grads, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                     const std::optional<at::Tensor>& extrap_lr_tensor, double beta1,
                     double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  check_list(params, "params", c10::DeviceType::CPU);
  check_aligned(params, anchors, "anchors");
  check_aligned(params, grads, "grads");
  check_optional_aligned(params, local_grads, "local_grads");
  check_aligned(params, exp_avgs, "exp_avgs");
  check_aligned(params, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK_VALUE(steps.size() == params.size(), "steps has ", steps.size(),
                    " entries but params has ", params.size());
  check_steps(params, steps, 0.0);
  check_nonnegative(lr, "lr");
  check_nonnegative(extrap_lr, "extrap_lr");
  check_nonnegative(eps, "eps");
  check_nonnegative(weight_decay, "weight_decay");
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  AdamParams ap;
  const double lr_v = optional_scalar(lr_tensor, "lr_tensor", lr);
  ap.extrap_lr = optional_scalar(extrap_lr_tensor, "extrap_lr_tensor", extrap_lr);
  ap.has_scale = grad_scale.has_value();
  ap.grad_scale = optional_scalar(grad_scale, "grad_scale", 1.0);
  if (optional_scalar(found_inf, "found_inf", 0.0) != 0.0) return;

  ap.weight_decay = weight_decay;
  ap.decay = 1.0 - lr_v * weight_decay;
  ap.beta1 = beta1;
  ap.beta2 = beta2;
  ap.eps = eps;
  ap.decoupled = decoupled_weight_decay;
  ap.has_local = !local_grads.empty();
  const auto& K = kernels();

  for (const auto& [dtype, index] : group_by_dtype(params)) {
    ExtrapLists flat(index, params, anchors, exp_avgs, exp_avg_sqs, grads, local_grads, false);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<AdamTensorCoefs> coefs(n);
    std::vector<Chunk> chunks;
    for (int64_t k = 0; k < n; ++k) {
      // The counter is incremented in fp32 and read as a double, as torch.optim.Adam does.
      const double t = static_cast<double>(*steps[index[k]].const_data_ptr<float>() + 1.f);
      coefs[k].step_size = lr_v / (1.0 - std::pow(beta1, t));
      coefs[k].bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, t));
      append_chunks(chunks, k, flat.ptrs[k].numel);
    }
    parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
      K.extrap_adam(dtype, flat.ptrs.data(), chunks.data(), c0, c1, coefs.data(), ap);
    });
    flat.write_back();
  }
  for (const at::Tensor& s : steps) *s.mutable_data_ptr<float>() += 1.f;
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("extrap_sgd_", &extrap_sgd_cpu);
  m.impl("extrap_adam_", &extrap_adam_cpu);
}

}  // namespace lbkernels::cpu
