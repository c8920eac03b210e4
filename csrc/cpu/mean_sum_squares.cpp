// CPU kernel of mean_sum_squares_ (docs/algorithms.md section 1.1): the arguments checked
// by lbkernels/mean_sum_squares_args.h, then one parallel region over the 64K-element
// chunks of the flat buffer (a chunk never spans two segments), each divided in place
// and its sum of squares taken in the same visit; the chunks' sums are added per segment
// in chunk order (deterministic for any thread count).
//
// Allocates nothing proportional to the model: 24 + 8 bytes per 64K elements.
#include <torch/library.h>

#include <vector>

#include <lbkernels/mean_sum_squares_args.h>

#include "multi_tensor.h"

namespace lbkernels::cpu {

namespace {

void mean_sum_squares_cpu(const at::Tensor& flat, at::IntArrayRef sizes, int64_t world_size,
                          const at::Tensor& out) {
  check_mean_sum_squares_args(flat, sizes, world_size, out, c10::DeviceType::CPU);
  std::vector<Chunk> chunks;
  int64_t offset = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    for (int64_t b = 0; b < sizes[j]; b += kChunk)
      chunks.push_back({static_cast<int64_t>(j), offset + b, offset + std::min(sizes[j], b + kChunk)});
    offset += sizes[j];
  }
  std::vector<double> partial(chunks.size());
  const auto& K = kernels();
  const c10::ScalarType dtype = flat.scalar_type();
  void* data = flat.data_ptr();
  const double k = static_cast<double>(world_size);
  parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
    K.mean_sum_squares(dtype, data, chunks.data(), c0, c1, k, partial.data());
  });
  double* o = out.mutable_data_ptr<double>();
  for (size_t j = 0; j < sizes.size(); ++j) o[j] = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) o[chunks[c].tensor] += partial[c];
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("mean_sum_squares_", &mean_sum_squares_op<mean_sum_squares_cpu>);
}

}  // namespace lbkernels::cpu
