// CUDA kernels of multi_tensor_l2norm and lars_sgd_: dtype groups and the three launches
// per group (four with the norm cache; lars_kernels.cuh) after the argument checks of
// lbkernels/lars_args.h, registered for the CUDA key.
//
// Nothing here reads a device value on the host: norms, norm_sq, trust ratios, lr_tensor,
// grad_scale and found_inf stay on the device, so a step never synchronises and can be
// captured in a CUDA graph. Scratch is 16 bytes per 64K-element chunk plus 24 per tensor.
//
// The cache of ||w||^2 (w_norm_sq on the device, w_norm_key on the CPU): the key is
// compared on the host (no device read) and travels as kFlagCachedKey in the norm passes'
// per-tensor flags; the entry itself is read on the device only. The update sums the new
// w (lars_kernels.cuh, pass 4) and the keys of the adapted tensors are marked "written
// by this call" (version kVersionPending, address): the op's wrapper (lars_sgd_op)
// writes their version counters once it has bumped them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/lars_args.h>

#include <optional>
#include <vector>

#include "average_kernels.cuh"
#include "host_args.cuh"
#include "lars_kernels.cuh"

namespace lbkernels::cuda {
namespace {

// The keys of the adapted params after the kernels: "written by this call".
void mark_w_norm_keys(const LarsSgdArgs& a) {
  for (int64_t i = 0; i < static_cast<int64_t>(a.params.size()); ++i)
    if (!a.exclude.get(i)) mark_w_norm_written(a, i);
}

// Writes into out (checked first); the chunks' partial sums are still one scratch tensor
// per dtype (16 bytes per 64K-element chunk), from the caching allocator.
void multi_tensor_l2norm_out_cuda(at::TensorList xs, at::Tensor out) {
  check_list(xs, "xs", c10::DeviceType::CUDA);
  check_l2norm_out(xs, out);
  if (xs.empty()) return;
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, index] : group_by_dtype(xs)) {
    Staging staging;
    std::vector<TensorArgs<1>> chunks, tensors;
    int64_t total = 0;
    for (const int64_t i : index) {
      const at::Tensor x = staging.lead(xs[i], false);
      const TensorArgs<1> t{{const_cast<void*>(x.const_data_ptr())}, x.numel(), total,
                            static_cast<int32_t>(i), 0};
      chunks.push_back(t);
      tensors.push_back(t);
      total += num_chunks(x.numel());
    }
    at::Tensor partial =
        at::empty({std::max<int64_t>(total, 1)}, out.options().dtype(opmath_dtype(dtype)));
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      A* p = partial.mutable_data_ptr<A>();
      C10_CUDA_CHECK(multi_tensor_apply<1>(chunks, Blocks::kPerChunk, kChunkThreads, stream,
                                           SumSquares<T, 1>{p, total, {}, {}}));
      C10_CUDA_CHECK(multi_tensor_apply<1>(tensors, Blocks::kPerTensor, kTensorThreads, stream,
                                           Norms<T>{p, out.mutable_data_ptr<float>()}));
    });
  }
  bump_version(out);
}

at::Tensor multi_tensor_l2norm_cuda(at::TensorList xs) {
  const at::TensorOptions options = xs.empty() ? at::TensorOptions().dtype(at::kFloat)
                                               : xs[0].options().dtype(at::kFloat);
  at::Tensor out = at::empty({static_cast<int64_t>(xs.size())}, options);
  multi_tensor_l2norm_out_cuda(xs, out);
  return out;
}

void lars_sgd_cuda(const LarsSgdArgs& a) {
  if (a.params.empty()) return;
  const at::TensorList params = a.params;
  const bool has_momentum = a.has_momentum();
  const c10::Device dev = params[0].device();
  const c10::cuda::CUDAGuard guard(dev);
  const StepScalars sc(a.lr_tensor, std::nullopt, a.grad_scale, a.found_inf, params[0]);
  if (sc.skip()) return;
  const bool averaging = !a.averages.empty();
  int64_t* count_ptr = averaging && a.average_count.has_value()
                           ? a.average_count->mutable_data_ptr<int64_t>() : nullptr;
  const FoldedAverage folded{count_ptr, 1.0 - a.average_decay, a.average_method == "swa"};
  const double lr_v = sc.lr.host.value_or(a.lr);
  const DeviceScalar scale = sc.scale;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool paper = a.paper();
  const GivenNorms given = given_norms(a.norm_sq);  // read on the device only
  const bool cache = a.w_norm_sq.has_value();
  double* w_cache = cache ? a.w_norm_sq->mutable_data_ptr<double>() : nullptr;
  at::Tensor coefs;
  TensorCoefs* c = per_tensor_scratch<TensorCoefs>(coefs, params);

  Staging staging;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    std::vector<TensorArgs<2>> norms;
    std::vector<TensorArgs<1>> tensors;
    std::vector<TensorArgs<3>> updates;
    std::vector<TensorArgs<4>> averaged;  // the updates with the folded averaging
    int64_t total = 0;
    for (const int64_t i : index) {
      const at::Tensor w = staging.lead(params[i], true);
      const at::Tensor g = staging.follow(a.grads[i], w, false);
      void* b = has_momentum ? staging.follow(a.momentum_buffers[i], w, true).data_ptr() : nullptr;
      void* step = has_momentum && !a.steps.empty() ? a.steps[i].data_ptr() : nullptr;
      void* g_ptr = const_cast<void*>(g.const_data_ptr());
      const bool excluded = a.exclude.get(i);
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      const uint8_t cached =
          cache && !excluded && w_norm_key_matches(a, i) ? kFlagCachedKey : uint8_t{0};
      const uint8_t excluded_flag = excluded ? kFlagExcluded : uint8_t{0};
      if (!excluded) norms.push_back({{w.data_ptr(), g_ptr}, numel, total, idx, cached});
      tensors.push_back({{step}, numel, total, idx, static_cast<uint8_t>(excluded_flag | cached)});
      if (averaging) {
        // The average in w's layout, in its own dtype (fp32 for 16-bit params).
        void* a_ptr = staging.follow_as(a.averages[i], w, true).data_ptr();
        averaged.push_back({{w.data_ptr(), g_ptr, b, a_ptr}, numel, total, idx, excluded_flag});
      } else {
        updates.push_back({{w.data_ptr(), g_ptr, b}, numel, total, idx, excluded_flag});
      }
      total += num_chunks(numel);
    }
    at::Tensor partial = at::empty({2 * std::max<int64_t>(total, 1)},
                                   params[0].options().dtype(opmath_dtype(dtype)));
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      const A* p = partial.mutable_data_ptr<A>();
      C10_CUDA_CHECK(multi_tensor_apply<2>(
          norms, Blocks::kPerChunk, kChunkThreads, stream,
          SumSquares<T, 2>{partial.mutable_data_ptr<A>(), total, scale, sc.found_inf.device,
                           given, w_cache}));
      C10_CUDA_CHECK(multi_tensor_apply<1>(
          tensors, Blocks::kPerTensor, kTensorThreads, stream,
          LarsCoefs<T>{p, total, c, lr_v, a.weight_decay, a.trust_coefficient, a.eps,
                       sc.lr.device, sc.found_inf.device, a.clip, a.zero_norm_decay,
                       has_momentum, scale, given, w_cache}));
      const bool nesterov = a.nesterov && has_momentum;
      // With the cache, the update writes the new w's chunk sums over the w partials
      // (row 0), which LarsCoefs has read by then (stream order).
      A* w_sq = cache ? partial.mutable_data_ptr<A>() : nullptr;
      if (averaging) {
        C10_CUDA_CHECK(multi_tensor_apply<4>(
            averaged, Blocks::kPerChunk, kChunkThreads, stream,
            LarsUpdate<T, 4>{c, lr_v, a.momentum, 1.0 - a.dampening, sc.lr.device, scale,
                             sc.found_inf.device, has_momentum, nesterov, paper, folded,
                             w_sq}));
      } else {
        C10_CUDA_CHECK(multi_tensor_apply<3>(
            updates, Blocks::kPerChunk, kChunkThreads, stream,
            LarsUpdate<T>{c, lr_v, a.momentum, 1.0 - a.dampening, sc.lr.device, scale,
                          sc.found_inf.device, has_momentum, nesterov, paper, {}, w_sq}));
      }
      if (cache) {
        C10_CUDA_CHECK(multi_tensor_apply<1>(
            tensors, Blocks::kPerTensor, kTensorThreads, stream,
            StoreWNormSq<T>{p, w_cache, sc.found_inf.device}));
      }
    });
  }
  staging.write_back();
  if (cache) mark_w_norm_keys(a);
  // After every update launch of the call: each block read the count of before it.
  if (count_ptr != nullptr) {
    average_count_kernel<<<1, 1, 0, stream>>>(count_ptr, sc.found_inf.device);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cuda);
  m.impl("multi_tensor_l2norm.out", &multi_tensor_l2norm_out_cuda);
  m.impl("lars_sgd_", &lars_sgd_op<lars_sgd_cuda, c10::DeviceType::CUDA>);
}

}  // namespace lbkernels::cuda
