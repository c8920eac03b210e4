// CPU kernels of average_ and worker_mean_ (docs/algorithms.md sections 4 and 6): the
// arguments checked by lbkernels/average_args.h, then one parallel region over the
// chunks of every tensor of the call. The averages' dtype depends only on the params'
// (fp32, or fp64 for fp64 params) and the loops take the param dtype per chunk, so
// mixed-dtype calls need no grouping: one region in all.
//
// Allocates nothing proportional to the model: the chunk table is 24 bytes per 64K
// elements; only tensors the loops cannot walk (non-dense, or a param whose strides
// differ from its average's) go through a temporary.
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include <lbkernels/average_args.h>

#include "multi_tensor.h"

namespace lbkernels::cpu {
namespace {

void average_cpu(at::TensorList averages, at::TensorList params,
                 const std::optional<at::Tensor>& count, c10::string_view method, double decay,
                 const std::optional<at::Tensor>& found_inf) {
  check_average_args(averages, params, count, method, found_inf, c10::DeviceType::CPU);
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;

  const AverageParams ap = average_params(method, count, decay);

  // Walkable views: the average dense, the param in the average's strides.
  std::vector<TensorPtrs> ptrs;
  std::vector<Chunk> chunks;
  std::vector<c10::ScalarType> dtypes;
  Staging staging;
  ptrs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor a = staging.lead(averages[i], true);
    const at::Tensor w = staging.follow_as(params[i], a, false);
    ptrs.push_back(TensorPtrs{a.data_ptr(), w.const_data_ptr(), nullptr, a.numel()});
    const int64_t k = static_cast<int64_t>(ptrs.size()) - 1;
    const size_t before = chunks.size();
    append_chunks(chunks, k, a.numel());
    dtypes.insert(dtypes.end(), chunks.size() - before, params[i].scalar_type());
  }
  const auto& K = kernels();
  parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
    // A thread's range may span dtypes: hand each same-dtype run to the loops.
    for (int64_t c = c0; c < c1;) {
      int64_t e = c + 1;
      while (e < c1 && dtypes[e] == dtypes[c]) ++e;
      K.average_update(dtypes[c], ptrs.data(), chunks.data(), c, e, ap);
      c = e;
    }
  });
  staging.write_back();
  if (count.has_value()) *count->mutable_data_ptr<int64_t>() += 1;
}

// One parallel region over the chunks of every param. A param is written in place when
// it is contiguous (its memory order is the flat buffer's row-major order); any other
// layout goes through a contiguous temporary, copied back after the region.
void worker_mean_cpu(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  check_worker_mean_args(params, flat_sum, world_size, c10::DeviceType::CPU);
  std::vector<TensorPtrs> ptrs;
  std::vector<Chunk> chunks;
  Staging staging;
  ptrs.reserve(params.size());
  const char* sum = static_cast<const char*>(flat_sum.const_data_ptr());
  const int64_t elem = flat_sum.element_size();
  int64_t offset = 0;
  for (const at::Tensor& p : params) {
    const at::Tensor w = staging.output(p);
    ptrs.push_back(TensorPtrs{w.data_ptr(), sum + offset * elem, nullptr, p.numel()});
    append_chunks(chunks, static_cast<int64_t>(ptrs.size()) - 1, p.numel());
    offset += p.numel();
  }
  const auto& K = kernels();
  const c10::ScalarType dtype = flat_sum.scalar_type();
  const double k = static_cast<double>(world_size);
  parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
    K.worker_mean(dtype, ptrs.data(), chunks.data(), c0, c1, k);
  });
  staging.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("average_", &average_op<average_cpu>);
  m.impl("worker_mean_", &worker_mean_op<worker_mean_cpu>);
}

}  // namespace lbkernels::cpu
