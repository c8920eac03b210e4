// CPU kernels of multi_tensor_l2norm and lars_sgd_ (ALGORITHMS.md sections 1 and 6).
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
#include <torch/library.h>

#include <cstdlib>

#include "multi_tensor.h"

namespace lbkernels::cpu {

const char* capability_name() { return kernels().name; }

namespace {

int64_t block_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("LBK_CPU_BLOCK_BYTES");
    return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : int64_t(8) << 20;
  }();
  return bytes;
}

at::Tensor multi_tensor_l2norm_cpu(at::TensorList xs) {
  check_list(xs, "xs", c10::DeviceType::CPU);
  const int64_t n = static_cast<int64_t>(xs.size());
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  std::vector<double> sums(static_cast<size_t>(n), 0.0);
  for (const auto& [dtype, index] : group_by_dtype(xs)) {
    std::vector<at::Tensor> keep;
    std::vector<TensorPtrs> ptrs;
    std::vector<Chunk> chunks;
    for (int64_t k = 0; k < static_cast<int64_t>(index.size()); ++k) {
      const at::Tensor& x = xs[index[k]];
      keep.push_back(x.is_non_overlapping_and_dense() ? x : x.contiguous());
      ptrs.push_back({keep.back().data_ptr(), nullptr, nullptr, x.numel()});
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
  return out;
}

void lars_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList steps, const c10::List<bool>& exclude, double lr,
                  const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                  double weight_decay, bool nesterov, double trust_coefficient, double eps,
                  bool clip, bool zero_norm_decay, c10::string_view momentum_style,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  std::optional<at::TensorList> average_list,
                  const std::optional<at::Tensor>& average_count,
                  c10::string_view average_method, double average_decay) {
  const at::TensorList averages = average_list.has_value() ? *average_list : at::TensorList();
  // -- every check before the first write
  check_list(params, "params", c10::DeviceType::CPU);
  check_aligned(params, grads, "grads");
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    check_aligned(params, momentum_buffers, "momentum_buffers");
    check_steps(params, steps, dampening);
  }
  TORCH_CHECK_VALUE(exclude.size() == params.size(), "exclude has ", exclude.size(),
                    " entries but params has ", params.size());
  check_momentum_style(momentum_style);
  const double lr_v = lr_tensor.has_value() ? scalar_value(lr_tensor, "lr_tensor") : lr;
  SgdParams sp;
  if (grad_scale.has_value()) {
    sp.grad_scale = scalar_value(grad_scale, "grad_scale");
    sp.has_scale = true;
  }
  if (found_inf.has_value())
    TORCH_CHECK_VALUE(found_inf->numel() == 1, "found_inf must hold exactly one element");
  check_folded_average(params, averages, average_count, average_method);
  if (found_inf.has_value() && scalar_value(found_inf, "found_inf") != 0.0) return;

  // Folded averaging: r = 1 / (n + 1) (SWA) or 1 - decay (EMA), rounded once to each
  // arithmetic type as average_ computes it.
  const bool averaging = !averages.empty();
  if (averaging) {
    if (average_method == "swa") {
      const int64_t n = *average_count->const_data_ptr<int64_t>();
      sp.average_r64 = 1.0 / (static_cast<double>(n) + 1.0);
      sp.average_r32 = 1.f / (static_cast<float>(n) + 1.f);
    } else {
      sp.average_r64 = 1.0 - average_decay;
      sp.average_r32 = static_cast<float>(1.0 - average_decay);
    }
  }
  sp.momentum = momentum;
  sp.dampening = dampening;
  sp.has_momentum = has_momentum;
  sp.nesterov = nesterov;
  const LarsParams lp{lr_v, weight_decay, trust_coefficient, eps, clip, zero_norm_decay,
                      momentum_style == "paper"};
  const auto& K = kernels();
  const at::TensorList bufs = has_momentum ? momentum_buffers : at::TensorList();

  for (const auto& [dtype, index] : group_by_dtype(params)) {
    FlatLists flat(params, grads, bufs, index);
    if (averaging) flat.add_averages(averages, index);
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<TensorCoefs> coefs(n);
    std::vector<Chunk> whole, chunks, norm_chunks;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = index[k];
      coefs[k].excluded = exclude.get(i);
      coefs[k].first = has_momentum && !steps.empty() && *steps[i].const_data_ptr<float>() == 0.f;
      if (flat.ptrs[k].numel <= kChunk) whole.push_back({k, 0, flat.ptrs[k].numel});
    }
    // Small tensors: one region, each tensor visited once by one thread.
    parallel_chunks(static_cast<int64_t>(whole.size()), [&](int64_t c0, int64_t c1) {
      K.lars_whole(dtype, flat.ptrs.data(), whole.data(), c0, c1, coefs.data(), lp, sp);
    });
    // Large tensors: blocks that fit the last-level cache, two sweeps each.
    const int64_t elem = c10::elementSize(dtype);
    std::vector<double> partial, sum_w2(n), sum_g2(n);
    int64_t k = 0;
    while (k < n) {
      chunks.clear();
      norm_chunks.clear();
      int64_t bytes = 0, k_end = k;
      for (; k_end < n && (bytes == 0 || bytes < block_bytes()); ++k_end) {
        const int64_t numel = flat.ptrs[k_end].numel;
        if (numel <= kChunk) continue;
        append_chunks(chunks, k_end, numel);
        if (!coefs[k_end].excluded) append_chunks(norm_chunks, k_end, numel);
        bytes += 2 * numel * elem;
      }
      if (!norm_chunks.empty()) {
        partial.assign(2 * norm_chunks.size(), 0.0);
        parallel_chunks(static_cast<int64_t>(norm_chunks.size()), [&](int64_t c0, int64_t c1) {
          K.sum_squares(dtype, flat.ptrs.data(), norm_chunks.data(), c0, c1, partial.data());
        });
        for (size_t c = 0; c < norm_chunks.size(); ++c) {
          sum_w2[norm_chunks[c].tensor] += partial[2 * c];
          sum_g2[norm_chunks[c].tensor] += partial[2 * c + 1];
        }
      }
      for (int64_t j = k; j < k_end; ++j)
        if (flat.ptrs[j].numel > kChunk) lars_coefs(sum_w2[j], sum_g2[j], lp, sp, coefs[j]);
      parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
        K.sgd_update(dtype, flat.ptrs.data(), chunks.data(), c0, c1, coefs.data(), sp);
      });
      k = k_end;
    }
    flat.write_back();
  }
  if (has_momentum)
    for (const at::Tensor& s : steps) *s.mutable_data_ptr<float>() += 1.f;
  if (averaging && average_count.has_value()) *average_count->mutable_data_ptr<int64_t>() += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cpu);
  m.impl("lars_sgd_", &lars_sgd_cpu);
}

}  // namespace lbkernels::cpu
