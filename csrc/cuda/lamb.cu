// CUDA kernel of lamb_: dtype groups and the launches of lamb_kernels.cuh after the
// argument checks of lbkernels/lamb_args.h, registered for the CUDA key.
//
// Nothing here reads a device value on the host: norms, trust ratios, the clipping
// divisor, lr_tensor, grad_scale and found_inf stay on the device, so a step never
// synchronises and can be captured in a CUDA graph. Scratch: 16 bytes per 64K-element
// chunk, 16 per tensor and 8 per dtype group (plus 8 for the clipping divisor), one
// allocation per group and one per call, as lars_sgd_.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <lbkernels/lamb_args.h>

#include <optional>
#include <vector>

#include "average_kernels.cuh"
#include "host_args.cuh"
#include "lamb_kernels.cuh"

namespace lbkernels::cuda {
namespace {

// The launch lists of one dtype group.
struct LambGroup {
  c10::ScalarType dtype;
  std::vector<TensorArgs<1>> grads;     // pass 0: the gradients
  std::vector<TensorArgs<5>> moments;   // pass 1: w, g, m, v, step
  std::vector<TensorArgs<1>> counters;  // pass 2: step
  std::vector<TensorArgs<4>> updates;   // pass 3: w, g, m, v
  std::vector<TensorArgs<5>> averaged;  // pass 3 with the folded averaging: ..., avg
  int64_t total = 0;                    // chunks
  at::Tensor partial;                   // sums of squares: w (or g, pass 0), then u
};

// Pass 0: the clipping divisor into *clip, from grad_norm or from every gradient's
// sum of squares (each group's into group_sums[k]).
void launch_clip(const LambArgs& a, const StepScalars& sc, std::vector<LambGroup>& groups,
                 double* group_sums, double* clip, cudaStream_t stream) {
  ScalarArg grad_norm(a.grad_norm, a.params[0].device());
  const DeviceScalar norm = grad_norm.on_device(a.params[0].options());
  bool all_double = true;
  if (!a.grad_norm.has_value()) {
    for (size_t k = 0; k < groups.size(); ++k) {
      LambGroup& gr = groups[k];
      all_double = all_double && gr.dtype == c10::kDouble;
      dispatch_float(gr.dtype, [&](auto tag) {
        using T = decltype(tag);
        using A = opmath_t<T>;
        A* p = gr.partial.mutable_data_ptr<A>();
        C10_CUDA_CHECK(multi_tensor_apply<1>(gr.grads, Blocks::kPerChunk, kChunkThreads, stream,
                                             SumSquares<T, 1>{p, gr.total, {}, sc.found_inf.device}));
        lamb_group_sum<A><<<1, kTensorThreads, 0, stream>>>(p, gr.total, group_sums + k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  } else {
    all_double = a.grad_norm->scalar_type() == c10::kDouble;
  }
  // The reference's dtype for N: fp64 when every gradient (or grad_norm) is, else fp32.
  const int n_groups = a.grad_norm.has_value() ? 0 : static_cast<int>(groups.size());
  const DeviceScalar given = a.grad_norm.has_value() ? norm : DeviceScalar{};
  if (all_double) {
    lamb_clip_kernel<double><<<1, 1, 0, stream>>>(group_sums, n_groups, given, sc.scale,
                                                 *a.max_grad_norm, clip);
  } else {
    lamb_clip_kernel<float><<<1, 1, 0, stream>>>(group_sums, n_groups, given, sc.scale,
                                                *a.max_grad_norm, clip);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lamb_cuda(const LambArgs& a) {
  if (a.params.empty()) return;
  const at::TensorList params = a.params;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const StepScalars sc(a.lr_tensor, std::nullopt, a.grad_scale, a.found_inf, params[0]);
  if (sc.skip()) return;
  const LambStage stage = a.stage();
  // The moments stage writes no weight: nothing to average.
  const bool averaging = !a.averages.empty() && stage != LambStage::kMoments;
  int64_t* count_ptr = averaging && a.average_count.has_value()
                           ? a.average_count->mutable_data_ptr<int64_t>() : nullptr;
  const FoldedAverage folded{count_ptr, 1.0 - a.average_decay, a.average_method == "swa"};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Staging staging;
  std::vector<LambGroup> groups;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    LambGroup gr;
    gr.dtype = dtype;
    for (const int64_t i : index) {
      const at::Tensor w = staging.lead(params[i], true);
      void* g = const_cast<void*>(staging.follow(a.grads[i], w, false).const_data_ptr());
      void* m = staging.follow(a.exp_avgs[i], w, true).data_ptr();
      void* v = staging.follow(a.exp_avg_sqs[i], w, true).data_ptr();
      void* step = a.steps[i].data_ptr();
      const int64_t numel = w.numel();
      const auto idx = static_cast<int32_t>(i);
      const auto excluded = static_cast<uint8_t>(a.exclude.get(i));
      gr.grads.push_back({{g}, numel, gr.total, idx, 0});
      gr.moments.push_back({{w.data_ptr(), g, m, v, step}, numel, gr.total, idx, excluded});
      gr.counters.push_back({{step}, numel, gr.total, idx, excluded});
      if (averaging) {
        // The average in w's layout, in its own dtype (fp32 for 16-bit params).
        void* avg = staging.follow_as(a.averages[i], w, true).data_ptr();
        gr.averaged.push_back({{w.data_ptr(), g, m, v, avg}, numel, gr.total, idx, 0});
      } else {
        gr.updates.push_back({{w.data_ptr(), g, m, v}, numel, gr.total, idx, 0});
      }
      gr.total += num_chunks(numel);
    }
    gr.partial = at::empty({2 * std::max<int64_t>(gr.total, 1)},
                           params[0].options().dtype(opmath_dtype(dtype)));
    groups.push_back(std::move(gr));
  }

  // Scratch (doubles): a LambTensor per param, a sum per group, the clipping divisor.
  const auto n_params = static_cast<int64_t>(params.size());
  const auto n_groups = static_cast<int64_t>(groups.size());
  at::Tensor scratch = at::empty({2 * n_params + n_groups + 1},
                                 params[0].options().dtype(at::kDouble));
  double* base = scratch.mutable_data_ptr<double>();
  LambTensor* tensors = reinterpret_cast<LambTensor*>(base);
  double* clip = base + 2 * n_params + n_groups;
  const LambOptions options = lamb_options(a, sc.lr.host.value_or(a.lr));
  DeviceScalar clip_scalar;
  if (options.has_clip) {
    launch_clip(a, sc, groups, base + 2 * n_params, clip, stream);
    clip_scalar = {clip, ScalarKind::kDouble};
  }
  const LambScalars s{options, sc.scale, clip_scalar, sc.found_inf.device};
  LambNormSq norm_sq;
  if (a.norm_sq.has_value())  // read or written on the device only, in stream order
    norm_sq = {a.norm_sq->data_ptr(), a.norm_sq->scalar_type() == c10::kDouble,
               a.norm_sq->size(1), stage == LambStage::kUpdate};

  for (LambGroup& gr : groups) {
    // fp32/fp64 moments are stored exactly by pass 1; 16-bit ones by pass 3, or by pass 1
    // in the moments stage (the update stage then reads them back).
    const bool store = gr.dtype == c10::kFloat || gr.dtype == c10::kDouble ||
                       stage == LambStage::kMoments;
    dispatch_float(gr.dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = opmath_t<T>;
      A* p = gr.partial.mutable_data_ptr<A>();
      if (stage != LambStage::kUpdate)
        C10_CUDA_CHECK(multi_tensor_apply<5>(gr.moments, Blocks::kPerChunk, kChunkThreads,
                                             stream, LambMoments<T>{p, gr.total, s, store}));
      // A block per tensor, empty ones included: every counter counts the step.
      C10_CUDA_CHECK(multi_tensor_apply<1>(gr.counters, Blocks::kPerTensor, kTensorThreads,
                                           stream, LambRatio<T>{p, gr.total, tensors, s, norm_sq}));
      if (stage == LambStage::kMoments) return;
      const bool stored = store || stage == LambStage::kUpdate;
      if (averaging) {
        C10_CUDA_CHECK(multi_tensor_apply<5>(
            gr.averaged, Blocks::kPerChunk, kChunkThreads, stream,
            LambUpdate<T, 5>{tensors, s, sc.lr.device, stored, folded}));
      } else {
        C10_CUDA_CHECK(multi_tensor_apply<4>(
            gr.updates, Blocks::kPerChunk, kChunkThreads, stream,
            LambUpdate<T>{tensors, s, sc.lr.device, stored, {}}));
      }
    });
  }
  staging.write_back();
  // After every update launch of the call: each block read the count of before it.
  if (count_ptr != nullptr) {
    average_count_kernel<<<1, 1, 0, stream>>>(count_ptr, sc.found_inf.device);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CUDA, m) {
  m.impl("lamb_", &lamb_op<lamb_cuda, c10::DeviceType::CUDA>);
}

}  // namespace lbkernels::cuda
