// CUDA kernels of extrap_sgd_ and extrap_adam_ (docs/algorithms.md section 2): dtype groups
// and the launches per group (extrap_kernels.cuh, extrap_adam_kernels.cuh) after the
// argument checks of lbkernels/extrap_args.h, registered for the CUDA key.
//
// Nothing here reads a device value on the host: norm_sq, trust ratios, filter norms, step
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

#include <lbkernels/extrap_args.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "extrap_adam_kernels.cuh"
#include "extrap_kernels.cuh"
#include "host_args.cuh"

namespace lbkernels::cuda {
namespace {

// Elements per output filter: dim 0 is the filter for ndim >= 2; a 0-d or 1-d tensor
// is one filter.
int64_t filter_size(const at::Tensor& x) {
  return x.dim() >= 2 ? x.numel() / x.size(0) : x.numel();
}

StepScalars step_scalars(const ExtrapCommonArgs& a) {
  return StepScalars(a.lr_tensor, a.extrap_lr_tensor, a.grad_scale, a.found_inf, a.params[0]);
}

void extrap_sgd_cuda(const ExtrapSgdArgs& a) {
  if (a.params.empty()) return;
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const StepScalars sc = step_scalars(a);
  if (sc.skip()) return;
  const at::TensorList params = a.params;
  const Extrapolation mode = a.mode;
  const bool has_momentum = a.has_momentum();
  const double weight_decay = a.weight_decay, noise_scale = a.noise_scale;
  const double lr_v = sc.lr.host.value_or(a.lr);
  const double elr_v = sc.extrap_lr.host.value_or(a.extrap_lr);
  const c10::Device dev = params[0].device();
  const at::TensorOptions on_dev = params[0].options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto n_params = static_cast<int64_t>(params.size());
  const NoiseKey key{static_cast<uint64_t>(a.seed), static_cast<uint64_t>(a.offset)};
  const bool filter = mode == Extrapolation::kFilter;
  const GivenNorms given = given_norms(a.norm_sq);  // read on the device only (lars)

  at::Tensor coefs;  // trust ratios
  TensorCoefs* c = a.lars ? per_tensor_scratch<TensorCoefs>(coefs, params) : nullptr;
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
      const at::Tensor x = staging.follow(a.anchors[i], w, true);
      const at::Tensor g = staging.follow(a.grads[i], w, false);
      void* g_ptr = const_cast<void*>(g.const_data_ptr());
      void* gk_ptr = nullptr;  // gk = g without local gradients
      if (mode == Extrapolation::kPastGrad && !a.local_grads.empty())
        gk_ptr = const_cast<void*>(staging.follow(a.local_grads[i], w, false).const_data_ptr());
      void* b = has_momentum ? staging.follow(a.momentum_buffers[i], w, true).data_ptr() : nullptr;
      const bool excluded = a.exclude.get(i);
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      if (a.lars) {
        if (!excluded) norms.push_back({{x.data_ptr(), g_ptr}, numel, total, idx, 0});
        lars_tensors.push_back({{nullptr}, numel, total, idx, excluded ? kFlagExcluded : uint8_t{0}});
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
    if (a.lars) partial = at::empty({2 * std::max<int64_t>(total, 1)}, acc);
    if (filter) {
      pieces = at::empty({2 * std::max<int64_t>(group_pieces[gi], 1)}, acc);
      factors = at::empty({std::max<int64_t>(group_filters[gi], 1)}, acc);
    }
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      if (a.lars) {
        const A* p = partial.mutable_data_ptr<A>();
        C10_CUDA_CHECK(multi_tensor_apply<2>(
            norms, Blocks::kPerChunk, kChunkThreads, stream,
            SumSquares<T, 2>{partial.mutable_data_ptr<A>(), total, sc.scale, sc.found_inf.device,
                             given}));
        // zero_norm_decay: a zero norm sets r = 1 and keeps the weight decay; no counters.
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            lars_tensors, Blocks::kPerTensor, kTensorThreads, stream,
            LarsCoefs<T>{p, total, c, lr_v, weight_decay, a.trust_coefficient, a.eps,
                         sc.lr.device, sc.found_inf.device, a.clip, true, false, sc.scale,
                         given}));
      }
      C10_CUDA_CHECK(multi_tensor_apply<5>(
          updates, Blocks::kPerChunk, kChunkThreads, stream,
          ExtrapSgdUpdate<T>{c, lr_v, elr_v, a.momentum, weight_decay, noise_scale, sc.lr.device,
                             sc.extrap_lr.device, sc.scale, sc.found_inf.device, key, mode,
                             has_momentum, a.nesterov && has_momentum}));
      if (filter) {
        A* sums = pieces.mutable_data_ptr<A>();
        A* fac = factors.mutable_data_ptr<A>();
        const int64_t n_pieces = group_pieces[gi];
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            filter_chunks, Blocks::kPerChunk, kChunkThreads, stream,
            FilterSums<T>{sums, n_pieces, info_ptr, key, sc.found_inf.device}));
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            filter_tensors, Blocks::kPerTensor, kTensorThreads, stream,
            FilterFactors<T>{sums, n_pieces, info_ptr, fac, noise_scale, sc.found_inf.device}));
        C10_CUDA_CHECK(multi_tensor_apply<2>(
            filter_writes, Blocks::kPerChunk, kChunkThreads, stream,
            FilterWrite<T>{info_ptr, fac, key, sc.found_inf.device}));
      }
    });
  }
  staging.write_back();
}

void extrap_adam_cuda(const ExtrapAdamArgs& a) {
  if (a.params.empty()) return;
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const StepScalars sc = step_scalars(a);
  if (sc.skip()) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor bias;  // bias corrections, written on the device by AdamBiasPass
  AdamBias* b = per_tensor_scratch<AdamBias>(bias, a.params);

  Staging staging;
  for (const auto& [dtype, index] : group_by_dtype(a.params)) {
    std::vector<TensorArgs<1>> counters;
    std::vector<TensorArgs<6>> updates;
    int64_t total = 0;
    for (const int64_t i : index) {
      const at::Tensor w = staging.lead(a.params[i], true);
      void* x = staging.follow(a.anchors[i], w, true).data_ptr();
      void* m = staging.follow(a.exp_avgs[i], w, true).data_ptr();
      void* v = staging.follow(a.exp_avg_sqs[i], w, true).data_ptr();
      void* g = const_cast<void*>(staging.follow(a.grads[i], w, false).const_data_ptr());
      void* gk = nullptr;  // null: gk = g
      if (!a.local_grads.empty())
        gk = const_cast<void*>(staging.follow(a.local_grads[i], w, false).const_data_ptr());
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      counters.push_back({{a.steps[i].data_ptr()}, numel, total, idx, 0});
      updates.push_back({{w.data_ptr(), x, m, v, g, gk}, numel, total, idx, 0});
      total += num_chunks(numel);
    }
    // A block per tensor, empty ones included: every counter counts the step.
    C10_CUDA_CHECK(multi_tensor_apply<1>(counters, Blocks::kPerTensor, 32, stream,
                                         AdamBiasPass{b, a.beta1, a.beta2, sc.found_inf.device}));
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      C10_CUDA_CHECK(multi_tensor_apply<6>(
          updates, Blocks::kPerChunk, kChunkThreads, stream,
          ExtrapAdamUpdate<T>{b, sc.lr.host.value_or(a.lr),
                              sc.extrap_lr.host.value_or(a.extrap_lr), a.beta1, a.beta2, a.eps,
                              a.weight_decay, sc.lr.device, sc.extrap_lr.device, sc.scale,
                              sc.found_inf.device, a.decoupled_weight_decay}));
    });
  }
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("extrap_sgd_", &extrap_sgd_op<extrap_sgd_cuda, c10::DeviceType::CUDA>);
  m.impl("extrap_adam_", &extrap_adam_op<extrap_adam_cuda, c10::DeviceType::CUDA>);
}

}  // namespace lbkernels::cuda
