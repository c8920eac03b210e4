// CUDA kernels of extrap_sgd_ and extrap_adam_ (ALGORITHMS.md section 2): argument
// checks, dtype groups and the launches per group (extrap_kernels.cuh), registered for
// the CUDA key.
//
// Nothing here reads a device value on the host: trust ratios, filter norms, step
// counters, lr_tensor, extrap_lr_tensor, grad_scale and found_inf stay on the device, so
// a step never synchronises and can be captured in a CUDA graph. Scratch per call: with
// lars 16 bytes per 64K-element chunk plus 24 per tensor; the filter variant 8 bytes per
// filter piece plus 4 per filter plus 24 per tensor (uploaded from pinned memory);
// extrap_adam_ 16 bytes per tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/host.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "extrap_kernels.cuh"
#include "host_args.cuh"

namespace lbkernels::cuda {
namespace {

// The checks of lbkernels/reference/extrap.py, in its order and with its messages.
void check_common(at::TensorList params, at::TensorList anchors, at::TensorList grads,
                  at::TensorList local_grads) {
  check_aligned(params, anchors, "anchors");
  check_aligned(params, grads, "grads");
  TORCH_CHECK_VALUE(local_grads.empty() || local_grads.size() == params.size(),
                    "local_grads has ", local_grads.size(), " entries but params has ",
                    params.size(), " (or pass none)");
  check_list(params, "params", c10::DeviceType::CUDA);
  if (!local_grads.empty()) check_aligned(params, local_grads, "local_grads");
}

void check_nonnegative(const char* name, double v) {
  TORCH_CHECK_VALUE(v >= 0.0, name, " must be >= 0, got ", v);  // also rejects NaN
}

Extrapolation parse_extrapolation(c10::string_view s) {
  if (s == "past_grad") return Extrapolation::kPastGrad;
  if (s == "gaussian") return Extrapolation::kGaussian;
  if (s == "uniform") return Extrapolation::kUniform;
  if (s == "weight") return Extrapolation::kWeight;
  TORCH_CHECK_VALUE(s == "filter",
                    "extrapolation must be one of ('past_grad', 'gaussian', 'uniform', "
                    "'weight', 'filter'), got '", s, "'");
  return Extrapolation::kFilter;
}

// Elements per output filter: dim 0 is the filter for ndim >= 2; a 0-d or 1-d tensor
// is one filter.
int64_t filter_size(const at::Tensor& x) {
  return x.dim() >= 2 ? x.numel() / x.size(0) : x.numel();
}

void extrap_sgd_cuda(at::TensorList params, at::TensorList anchors,
                     at::TensorList momentum_buffers, at::TensorList grads,
                     at::TensorList local_grads, const c10::List<bool>& exclude, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                     const std::optional<at::Tensor>& extrap_lr_tensor, double momentum,
                     double weight_decay, bool nesterov, bool lars, double trust_coefficient,
                     double eps, bool clip, c10::string_view extrapolation, double noise_scale,
                     int64_t seed, int64_t offset, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  // -- every check before the first write
  check_common(params, anchors, grads, local_grads);
  TORCH_CHECK_VALUE(exclude.size() == params.size(), "exclude has ", exclude.size(),
                    " entries but params has ", params.size());
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_aligned(params, momentum_buffers, "momentum_buffers");
  const Extrapolation mode = parse_extrapolation(extrapolation);
  check_nonnegative("lr", lr);
  check_nonnegative("extrap_lr", extrap_lr);
  check_nonnegative("momentum", momentum);
  check_nonnegative("weight_decay", weight_decay);
  check_nonnegative("noise_scale", noise_scale);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  if (params.empty()) return;
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  ScalarArg lr_arg(lr_tensor, "lr_tensor", dev);
  ScalarArg elr_arg(extrap_lr_tensor, "extrap_lr_tensor", dev);
  ScalarArg scale_arg(grad_scale, "grad_scale", dev);
  const ScalarArg inf_arg(found_inf, "found_inf", dev);
  if (inf_arg.host.has_value() && *inf_arg.host != 0.0) return;
  const double lr_v = lr_arg.host.value_or(lr);
  const double elr_v = elr_arg.host.value_or(extrap_lr);
  const at::TensorOptions on_dev = params[0].options();
  const DeviceScalar scale = scale_arg.on_device(on_dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto n_params = static_cast<int64_t>(params.size());
  const NoiseKey key{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const bool filter = mode == Extrapolation::kFilter;

  at::Tensor coefs;  // trust ratios, by argument index
  TensorCoefs* c = nullptr;
  if (lars) {
    coefs = at::empty({n_params * 3}, on_dev.dtype(at::kDouble));
    c = reinterpret_cast<TensorCoefs*>(coefs.mutable_data_ptr<double>());
  }
  // Filter layout of every tensor, by argument index, with per-dtype-group slot bases.
  const auto groups = group_by_dtype(params);
  std::vector<int64_t> group_pieces, group_filters;
  at::Tensor info;
  if (filter) {
    at::Tensor host = at::empty({n_params * 3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    auto* fi = reinterpret_cast<FilterInfo*>(host.mutable_data_ptr<int64_t>());
    for (const auto& [dtype, index] : groups) {
      int64_t pieces = 0, filters = 0;
      for (const int64_t i : index) {
        const int64_t numel = params[i].numel();
        const int64_t f = numel > 0 ? filter_size(params[i]) : 1;
        fi[i] = {f, pieces, filters};
        if (numel > 0) {
          pieces += num_pieces(numel, f);
          filters += numel / f;
        }
      }
      group_pieces.push_back(pieces);
      group_filters.push_back(filters);
    }
    info = host.to(dev, /*non_blocking=*/true);
  }
  const auto* info_ptr = filter ? reinterpret_cast<const FilterInfo*>(info.const_data_ptr<int64_t>())
                                : nullptr;

  Staging staging;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& [dtype, index] = groups[gi];
    std::vector<TensorArgs<2>> norms, filter_writes;
    std::vector<TensorArgs<1>> lars_tensors, filter_chunks, filter_tensors;
    std::vector<TensorArgs<5>> updates;
    int64_t total = 0;
    for (const int64_t i : index) {
      // The noise is indexed by row-major position (philox.h) and filters are runs of
      // dim 0: the noise variants walk row-major (contiguous) memory.
      const at::Tensor w = staging.lead(params[i], true, mode != Extrapolation::kPastGrad);
      const at::Tensor x = staging.follow(anchors[i], w, true);
      const at::Tensor g = staging.follow(grads[i], w, false);
      void* g_ptr = const_cast<void*>(g.const_data_ptr());
      void* gk_ptr = nullptr;  // gk = g without local gradients
      if (mode == Extrapolation::kPastGrad && !local_grads.empty())
        gk_ptr = const_cast<void*>(staging.follow(local_grads[i], w, false).const_data_ptr());
      void* b = has_momentum ? staging.follow(momentum_buffers[i], w, true).data_ptr() : nullptr;
      const bool excluded = exclude.get(i);
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      if (lars) {
        if (!excluded) norms.push_back({{x.data_ptr(), g_ptr}, numel, total, idx, 0});
        lars_tensors.push_back({{nullptr}, numel, total, idx, static_cast<uint8_t>(excluded)});
      }
      updates.push_back({{w.data_ptr(), x.data_ptr(), b, g_ptr, gk_ptr}, numel, total, idx, 0});
      if (filter && numel > 0) {
        filter_chunks.push_back({{x.data_ptr()}, numel, total, idx, 0});
        filter_tensors.push_back({{x.data_ptr()}, numel, total, idx, 0});
        filter_writes.push_back({{w.data_ptr(), x.data_ptr()}, numel, total, idx, 0});
      }
      total += num_chunks(numel);
    }
    const at::TensorOptions acc = on_dev.dtype(opmath_dtype(dtype));
    at::Tensor partial, pieces, factors;
    if (lars) partial = at::empty({2 * std::max<int64_t>(total, 1)}, acc);
    if (filter) {
      pieces = at::empty({2 * std::max<int64_t>(group_pieces[gi], 1)}, acc);
      factors = at::empty({std::max<int64_t>(group_filters[gi], 1)}, acc);
    }
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      if (lars) {
        const A* p = partial.mutable_data_ptr<A>();
        C10_CUDA_CHECK(multi_tensor_apply<2>(
            norms, Blocks::kPerChunk, kChunkThreads, stream,
            SumSquares<T, 2>{partial.mutable_data_ptr<A>(), total, scale, inf_arg.device}));
        // zero_norm_decay: a zero norm sets r = 1 and keeps the weight decay; no counters.
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            lars_tensors, Blocks::kPerTensor, kTensorThreads, stream,
            LarsCoefs<T>{p, total, c, lr_v, weight_decay, trust_coefficient, eps,
                         lr_arg.device, inf_arg.device, clip, true, false}));
      }
      C10_CUDA_CHECK(multi_tensor_apply<5>(
          updates, Blocks::kPerChunk, kChunkThreads, stream,
          ExtrapSgdUpdate<T>{c, lr_v, elr_v, momentum, weight_decay, noise_scale, lr_arg.device,
                             elr_arg.device, scale, inf_arg.device, key, mode, has_momentum,
                             nesterov && has_momentum}));
      if (filter) {
        A* sums = pieces.mutable_data_ptr<A>();
        A* fac = factors.mutable_data_ptr<A>();
        const int64_t n_pieces = group_pieces[gi];
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            filter_chunks, Blocks::kPerChunk, kChunkThreads, stream,
            FilterSums<T>{sums, n_pieces, info_ptr, key, inf_arg.device}));
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            filter_tensors, Blocks::kPerTensor, kTensorThreads, stream,
            FilterFactors<T>{sums, n_pieces, info_ptr, fac, noise_scale, inf_arg.device}));
        C10_CUDA_CHECK(multi_tensor_apply<2>(
            filter_writes, Blocks::kPerChunk, kChunkThreads, stream,
            FilterWrite<T>{info_ptr, fac, key, inf_arg.device}));
      }
    });
  }
  staging.write_back();
}

void extrap_adam_cuda(at::TensorList params, at::TensorList anchors, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList grads,
                      at::TensorList local_grads, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double extrap_lr,
                      const std::optional<at::Tensor>& extrap_lr_tensor, double beta1,
                      double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  // -- every check before the first write
  check_common(params, anchors, grads, local_grads);
  check_aligned(params, exp_avgs, "exp_avgs");
  check_aligned(params, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK_VALUE(steps.size() == params.size(), "steps has ", steps.size(),
                    " entries but params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_TYPE(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, "steps[", i,
                     "] must be a one-element float32 tensor");
    TORCH_CHECK_VALUE(steps[i].device() == params[i].device(), "steps[", i, "] is on ",
                      steps[i].device(), " but params[", i, "] is on ", params[i].device());
  }
  check_nonnegative("lr", lr);
  check_nonnegative("extrap_lr", extrap_lr);
  check_nonnegative("eps", eps);
  check_nonnegative("weight_decay", weight_decay);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  if (params.empty()) return;
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  ScalarArg lr_arg(lr_tensor, "lr_tensor", dev);
  ScalarArg elr_arg(extrap_lr_tensor, "extrap_lr_tensor", dev);
  ScalarArg scale_arg(grad_scale, "grad_scale", dev);
  const ScalarArg inf_arg(found_inf, "found_inf", dev);
  if (inf_arg.host.has_value() && *inf_arg.host != 0.0) return;
  const at::TensorOptions on_dev = params[0].options();
  const DeviceScalar scale = scale_arg.on_device(on_dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor bias = at::empty({static_cast<int64_t>(params.size()) * 2}, on_dev.dtype(at::kDouble));
  auto* b = reinterpret_cast<AdamBias*>(bias.mutable_data_ptr<double>());

  Staging staging;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    std::vector<TensorArgs<1>> counters;
    std::vector<TensorArgs<6>> updates;
    int64_t total = 0;
    for (const int64_t i : index) {
      const at::Tensor w = staging.lead(params[i], true);
      void* x = staging.follow(anchors[i], w, true).data_ptr();
      void* m = staging.follow(exp_avgs[i], w, true).data_ptr();
      void* v = staging.follow(exp_avg_sqs[i], w, true).data_ptr();
      void* g = const_cast<void*>(staging.follow(grads[i], w, false).const_data_ptr());
      void* gk = local_grads.empty()  // null: gk = g
                     ? nullptr
                     : const_cast<void*>(staging.follow(local_grads[i], w, false).const_data_ptr());
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      counters.push_back({{steps[i].data_ptr()}, numel, total, idx, 0});
      updates.push_back({{w.data_ptr(), x, m, v, g, gk}, numel, total, idx, 0});
      total += num_chunks(numel);
    }
    // A block per tensor, empty ones included: every counter counts the step.
    C10_CUDA_CHECK(multi_tensor_apply<1>(counters, Blocks::kPerTensor, 32, stream,
                                         AdamBiasPass{b, beta1, beta2, inf_arg.device}));
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      C10_CUDA_CHECK(multi_tensor_apply<6>(
          updates, Blocks::kPerChunk, kChunkThreads, stream,
          ExtrapAdamUpdate<T>{b, lr_arg.host.value_or(lr), elr_arg.host.value_or(extrap_lr), beta1,
                              beta2, eps, weight_decay, lr_arg.device, elr_arg.device, scale,
                              inf_arg.device, decoupled_weight_decay}));
    });
  }
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("extrap_sgd_", &extrap_sgd_cuda);
  m.impl("extrap_adam_", &extrap_adam_cuda);
}

}  // namespace lbkernels::cuda
