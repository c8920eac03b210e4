// CPU kernel of average_ (ALGORITHMS.md sections 4 and 6): argument checks, then one
// parallel region over the chunks of every tensor of the call. The averages' dtype
// depends only on the params' (fp32, or fp64 for fp64 params) and the loops take the
// param dtype per chunk, so mixed-dtype calls need no grouping: one region in all.
//
// Allocates nothing proportional to the model: the chunk table is 24 bytes per 64K
// elements; only tensors the loops cannot walk (non-dense, or a param whose strides
// differ from its average's) go through a temporary.
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "multi_tensor.h"

namespace lbkernels::cpu {
namespace {

c10::ScalarType average_dtype(c10::ScalarType param) {
  return param == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// The same checks, in the same order and with the same messages, as
// lbkernels/reference/average.py: every one before the first write.
void check_average_args(at::TensorList averages, at::TensorList params,
                        const std::optional<at::Tensor>& count, c10::string_view method,
                        const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK_VALUE(method == "swa" || method == "ema",
                    "method must be one of ('swa', 'ema'), got '", method, "'");
  TORCH_CHECK_VALUE(averages.size() == params.size(), "averages has ", averages.size(),
                    " entries but params has ", params.size());
  check_list(params, "params", c10::DeviceType::CPU);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& a = averages[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(a.layout() == c10::kStrided, "params[", i, "] and averages[", i,
                     "] must be dense tensors");
    TORCH_CHECK_VALUE(a.device() == p.device(), "averages[", i, "] is on ", a.device(),
                      " but params[0] is on ", p.device());
    TORCH_CHECK_TYPE(a.scalar_type() == average_dtype(p.scalar_type()), "averages[", i,
                     "] has dtype ", a.scalar_type(), " but params[", i, "] (",
                     p.scalar_type(), ") is averaged in ", average_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(a.sizes() == p.sizes(), "averages[", i, "] has shape ", a.sizes(),
                      " but params[", i, "] has ", p.sizes());
  }
  if (!count.has_value()) {
    TORCH_CHECK_VALUE(method != "swa", "method='swa' needs count (a one-element int64 tensor)");
  } else {
    TORCH_CHECK_TYPE(count->numel() == 1 && count->scalar_type() == at::kLong,
                     "count must be a one-element int64 tensor, got ", count->scalar_type(),
                     " of shape ", count->sizes());
    TORCH_CHECK_VALUE(params.empty() || count->device() == params[0].device(), "count is on ",
                      count->device(), " but params[0] is on ", params[0].device());
  }
  if (found_inf.has_value())
    TORCH_CHECK_VALUE(found_inf->numel() == 1, "found_inf must hold exactly one element, got shape ",
                      found_inf->sizes());
}

void average_cpu(at::TensorList averages, at::TensorList params,
                 const std::optional<at::Tensor>& count, c10::string_view method, double decay,
                 const std::optional<at::Tensor>& found_inf) {
  check_average_args(averages, params, count, method, found_inf);
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;

  AverageParams ap{};
  if (method == "swa") {
    // r = 1 / (n + 1) in each arithmetic type, as the reference computes it.
    const int64_t n = *count->const_data_ptr<int64_t>();
    ap.r64 = 1.0 / (static_cast<double>(n) + 1.0);
    ap.r32 = 1.f / (static_cast<float>(n) + 1.f);
  } else {
    ap.r64 = 1.0 - decay;
    ap.r32 = static_cast<float>(1.0 - decay);
  }

  // Walkable views: the average dense, the param in the average's strides.
  std::vector<TensorPtrs> ptrs;
  std::vector<Chunk> chunks;
  std::vector<c10::ScalarType> dtypes;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending;  // (average, temporary)
  std::vector<at::Tensor> keep;
  ptrs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor a = averages[i];
    if (!a.is_non_overlapping_and_dense()) {
      at::Tensor tmp = a.contiguous();
      pending.emplace_back(a, tmp);
      a = tmp;
    }
    at::Tensor w = params[i];
    if (!(w.is_non_overlapping_and_dense() && w.strides() == a.strides())) {
      w = at::empty_like(a, w.options()).copy_(w);
      keep.push_back(w);
    }
    ptrs.push_back(TensorPtrs{a.data_ptr(), w.const_data_ptr(), nullptr, a.numel()});
    keep.push_back(a);
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
  for (auto& [orig, tmp] : pending) orig.copy_(tmp);
  if (count.has_value()) *count->mutable_data_ptr<int64_t>() += 1;
}

// Same checks and messages as check_worker_mean_args in lbkernels/reference/average.py.
void check_worker_mean_args(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size,
                            c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size must be an integer >= 1, got ", world_size);
  TORCH_CHECK_TYPE(flat_sum.layout() == c10::kStrided && flat_sum.dim() == 1 &&
                       flat_sum.is_contiguous(),
                   "flat_sum must be a contiguous 1-D tensor, got shape ", flat_sum.sizes(),
                   " and strides ", flat_sum.strides());
  TORCH_CHECK_TYPE(supported_dtype(flat_sum.scalar_type()), "flat_sum has dtype ",
                   flat_sum.scalar_type(), "; expected a floating dtype");
  TORCH_CHECK_VALUE(flat_sum.device().type() == device_type, "flat_sum is on ",
                    flat_sum.device(), " but this is the ", c10::DeviceTypeName(device_type),
                    " kernel");
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(p.layout() == c10::kStrided, "params[", i, "] has layout ", p.layout(),
                     "; expected a dense tensor");
    TORCH_CHECK_TYPE(p.scalar_type() == flat_sum.scalar_type(), "params[", i, "] has dtype ",
                     p.scalar_type(), " but flat_sum has ", flat_sum.scalar_type(),
                     " (pack one flat buffer per dtype)");
    TORCH_CHECK_VALUE(p.device() == flat_sum.device(), "params[", i, "] is on ", p.device(),
                      " but flat_sum is on ", flat_sum.device());
    total += p.numel();
  }
  TORCH_CHECK_VALUE(flat_sum.numel() == total, "flat_sum has ", flat_sum.numel(),
                    " elements but the params have ", total);
}

// One parallel region over the chunks of every param. A param is written in place when
// it is contiguous (its memory order is the flat buffer's row-major order); any other
// layout goes through a contiguous temporary, copied back after the region.
void worker_mean_cpu(at::TensorList params, const at::Tensor& flat_sum, int64_t world_size) {
  check_worker_mean_args(params, flat_sum, world_size, c10::DeviceType::CPU);
  std::vector<TensorPtrs> ptrs;
  std::vector<Chunk> chunks;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending;  // (param, temporary)
  ptrs.reserve(params.size());
  const char* sum = static_cast<const char*>(flat_sum.const_data_ptr());
  const int64_t elem = flat_sum.element_size();
  int64_t offset = 0;
  for (const at::Tensor& p : params) {
    at::Tensor w = p;
    if (!p.is_contiguous()) {
      w = at::empty(p.sizes(), p.options());
      pending.emplace_back(p, w);
    }
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
  for (auto& [orig, tmp] : pending) orig.copy_(tmp);
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("average_", &average_cpu);
  m.impl("worker_mean_", &worker_mean_cpu);
}

}  // namespace lbkernels::cpu
