// CPU kernel of lamb_ (docs/algorithms.md section 7); the arguments are checked by
// lbkernels/lamb_args.h before lamb_cpu runs.
//
// Where the time goes: AdamW moves 28 bytes per fp32 parameter (reads g, w, m, v, writes
// w, m, v). LAMB needs ||u|| of a whole tensor before it writes any of its w, so a plain
// two-pass kernel moves 40 (pass 1: 16 read + 8 for m, v; pass 2: 12 read + 4). The
// second pass is made to read from cache instead (lamb_kernel.cpp has the passes):
//  * tensors of at most one chunk (64K elements, 1 MiB of fp32 w, g, m, v) are done whole
//    by one thread: pass 1, ratio, pass 2 in one visit, the second from L2;
//  * larger tensors go in blocks of about LBK_CPU_BLOCK_BYTES (8 MiB) of w, g, m, v: one
//    parallel sweep of pass 1 (partial sums per chunk), a serial reduction per tensor,
//    one parallel sweep of pass 2 while the block is in the last-level cache. Pass 2
//    walks each thread's chunks backwards, so a tensor larger than the cache (BERT's
//    23M-element embedding) still finds the part pass 1 touched last in cache;
//  * pass 2 recomputes u from m and v. With the reference's three divisions per element
//    that cost about half of AdamW's whole step: one thread, CPU time, ResNet-50's set,
//    1.55-1.85x the time of torch.optim.AdamW(fused=True). Both passes now divide once
//    (lamb_kernel.cpp direction: times 1 / bc1, 1 / bc2): 1.29-1.47x (median 1.44) in
//    the same runs, interleaved, at the 40/28 = 1.43x of the bytes (bench/RESULTS.md).
//    An approximate root and reciprocal (rsqrt14, rcp14 and a Newton step each) was no
//    faster than the one division, alone from L2 (0.27 vs 0.28 ns/element);
//  * the stages (stage="moments" | "update", for sharded tensors whose sums of squares are
//    all-reduced between them) run one pass each over every chunk, unblocked: the
//    collective between them leaves nothing in cache. Their sums are the full step's (the
//    same 64K chunks summed in the same order, in double) and the update stage takes the
//    ratio in double from norm_sq as the full step does from its sums: moments + update
//    is the full step bit for bit with a float64 norm_sq; a float32 one rounds the sums
//    (2^-24 relative on each norm, so on r). The update stage reads w, m, v and writes w
//    for every dtype (16-bit moments are stored rounded by the moments stage: the full
//    step keeps them unrounded between its passes);
//  * the scalars (lr, grad_scale, grad_norm, found_inf, the step counters) are CPU
//    tensors read on the host, which costs no device synchronisation here; nothing
//    proportional to the model is allocated (the chunk table is 24 bytes per 64K elements).
#include <torch/library.h>

#include <cmath>

#include <lbkernels/lamb_args.h>

#include "multi_tensor.h"

namespace lbkernels::cpu {
namespace {

// The value of an optional one-element tensor, read on the host (a CPU tensor: no sync).
double value_or(const std::optional<at::Tensor>& t, double fallback) {
  return t.has_value() ? t->item<double>() : fallback;
}

// The sum of squares of every element of `xs` (the global gradient norm's square), in
// double across 64K-element chunks.
double sum_of_squares(at::TensorList xs) {
  double total = 0.0;
  const auto& K = kernels();
  for (const auto& [dtype, index] : group_by_dtype(xs)) {
    Staging staging;
    std::vector<TensorPtrs> ptrs;
    std::vector<Chunk> chunks;
    for (int64_t k = 0; k < static_cast<int64_t>(index.size()); ++k) {
      const at::Tensor x = staging.lead(xs[index[k]], false);
      ptrs.push_back({x.data_ptr(), nullptr, nullptr, x.numel()});
      append_chunks(chunks, k, x.numel());
    }
    std::vector<double> partial(2 * chunks.size());
    parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
      K.sum_squares(dtype, ptrs.data(), chunks.data(), c0, c1, partial.data());
    });
    for (size_t c = 0; c < chunks.size(); ++c) total += partial[2 * c];
  }
  return total;
}

// Entry (row, i) of the op's norm_sq (a CPU tensor of shape (2, n), float32 or float64).
double read_norm_sq(const at::Tensor& norm_sq, int64_t row, int64_t i) {
  const int64_t k = row * norm_sq.size(1) + i;
  return norm_sq.scalar_type() == c10::kDouble
             ? norm_sq.const_data_ptr<double>()[k]
             : static_cast<double>(norm_sq.const_data_ptr<float>()[k]);
}

void write_norm_sq(const at::Tensor& norm_sq, int64_t row, int64_t i, double value) {
  const int64_t k = row * norm_sq.size(1) + i;
  if (norm_sq.scalar_type() == c10::kDouble) {
    norm_sq.mutable_data_ptr<double>()[k] = value;
  } else {
    norm_sq.mutable_data_ptr<float>()[k] = static_cast<float>(value);
  }
}

// One stage over the tensors of one dtype group (`index`: their positions in the op's
// lists): every chunk in one parallel sweep.
void lamb_stage(const LambArgs& a, const LambParams& p, c10::ScalarType dtype,
                const std::vector<int64_t>& index, const std::vector<LambPtrs>& ptrs,
                std::vector<LambTensorCoefs>& coefs) {
  const auto& K = kernels();
  const at::Tensor& norm_sq = *a.norm_sq;
  const int64_t n = static_cast<int64_t>(index.size());
  std::vector<Chunk> chunks;
  for (int64_t k = 0; k < n; ++k) append_chunks(chunks, k, ptrs[k].numel);
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  if (a.stage() == LambStage::kUpdate) {
    for (int64_t k = 0; k < n; ++k)
      lamb_set_ratio(read_norm_sq(norm_sq, 0, index[k]), read_norm_sq(norm_sq, 1, index[k]), p,
                     coefs[k]);
    parallel_chunks(n_chunks, [&](int64_t c0, int64_t c1) {
      K.lamb(dtype, ptrs.data(), chunks.data(), c0, c1, coefs.data(), p, LambPass::kUpdate,
             nullptr);
    });
    return;
  }
  std::vector<double> partial(2 * chunks.size()), sums(2 * n, 0.0);
  parallel_chunks(n_chunks, [&](int64_t c0, int64_t c1) {
    K.lamb(dtype, ptrs.data(), chunks.data(), c0, c1, coefs.data(), p, LambPass::kMoments,
           partial.data());
  });
  // In chunk order, as the full step adds them.
  for (size_t c = 0; c < chunks.size(); ++c) {
    sums[2 * chunks[c].tensor] += partial[2 * c];
    sums[2 * chunks[c].tensor + 1] += partial[2 * c + 1];
  }
  for (int64_t k = 0; k < n; ++k) {
    const bool excluded = coefs[k].excluded;  // its moments are updated, its norms are 0
    write_norm_sq(norm_sq, 0, index[k], excluded ? 0.0 : sums[2 * k]);
    write_norm_sq(norm_sq, 1, index[k], excluded ? 0.0 : sums[2 * k + 1]);
  }
}

// The full step over one dtype group: small tensors whole, large ones in blocks.
void lamb_full(const LambParams& p, c10::ScalarType dtype, const std::vector<LambPtrs>& ptrs,
               std::vector<LambTensorCoefs>& coefs) {
  const auto& K = kernels();
  const auto n = static_cast<int64_t>(ptrs.size());
  std::vector<Chunk> whole, chunks, norm_chunks;
  for (int64_t k = 0; k < n; ++k)
    if (ptrs[k].numel <= kChunk) whole.push_back({k, 0, ptrs[k].numel});
  // Small tensors: one region, each tensor visited once by one thread.
  parallel_chunks(static_cast<int64_t>(whole.size()), [&](int64_t c0, int64_t c1) {
    K.lamb(dtype, ptrs.data(), whole.data(), c0, c1, coefs.data(), p, LambPass::kWhole,
           nullptr);
  });
  // Large tensors: blocks that fit the last-level cache, two sweeps each.
  const int64_t elem = c10::elementSize(dtype);
  std::vector<double> partial, sum_w2(n), sum_u2(n);
  int64_t k = 0;
  while (k < n) {
    // Pass 1 reads w, g, m, v: the block's bytes.
    const int64_t k_end = next_block(ptrs, k, 4 * elem,
                                     [&](int64_t j) { return coefs[j].excluded; }, chunks,
                                     norm_chunks);
    if (!norm_chunks.empty()) {
      partial.resize(2 * norm_chunks.size());
      parallel_chunks(static_cast<int64_t>(norm_chunks.size()), [&](int64_t c0, int64_t c1) {
        K.lamb(dtype, ptrs.data(), norm_chunks.data(), c0, c1, coefs.data(), p,
               LambPass::kNorms, partial.data());
      });
      for (size_t c = 0; c < norm_chunks.size(); ++c) {
        sum_w2[norm_chunks[c].tensor] += partial[2 * c];
        sum_u2[norm_chunks[c].tensor] += partial[2 * c + 1];
      }
    }
    for (int64_t j = k; j < k_end; ++j)
      if (ptrs[j].numel > kChunk) lamb_set_ratio(sum_w2[j], sum_u2[j], p, coefs[j]);
    parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c0, int64_t c1) {
      K.lamb(dtype, ptrs.data(), chunks.data(), c0, c1, coefs.data(), p, LambPass::kWrite,
             nullptr);
    });
    k = k_end;
  }
}

void lamb_cpu(const LambArgs& a) {
  if (value_or(a.found_inf, 0.0) != 0.0) return;
  const LambStage stage = a.stage();
  LambParams p;
  p.o = lamb_options(a, value_or(a.lr_tensor, a.lr));
  p.grad_scale = value_or(a.grad_scale, 1.0);
  if (p.o.has_clip) {
    // N: the norm of the unscaled gradients (grad_norm is that of the scaled ones).
    const double n = a.grad_norm.has_value() ? a.grad_norm->item<double>()
                                             : std::sqrt(sum_of_squares(a.grads));
    p.clip = lamb_clip_divisor(n / p.grad_scale, *a.max_grad_norm);
  }
  // The moments stage writes no weight: nothing to average.
  const bool averaging = !a.averages.empty() && stage != LambStage::kMoments;
  if (averaging) p.average = average_params(a.average_method, a.average_count, a.average_decay);
  // The update stage does not read g (null), nor count the step: the moments stage did.
  const bool reads_g = stage != LambStage::kUpdate;
  const float step_offset = reads_g ? 1.f : 0.f;

  for (const auto& [dtype, index] : group_by_dtype(a.params)) {
    Staging staging;
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<LambPtrs> ptrs(n);
    std::vector<LambTensorCoefs> coefs(n);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = index[k];
      const at::Tensor w = staging.lead(a.params[i], true);
      ptrs[k] = {w.data_ptr(),
                 reads_g ? staging.follow(a.grads[i], w, false).const_data_ptr() : nullptr,
                 staging.follow(a.exp_avgs[i], w, true).data_ptr(),
                 staging.follow(a.exp_avg_sqs[i], w, true).data_ptr(),
                 averaging ? staging.follow_as(a.averages[i], w, true).data_ptr() : nullptr,
                 w.numel()};
      // The counter is incremented in fp32 and read as a double, as the reference does.
      coefs[k].t = static_cast<double>(*a.steps[i].const_data_ptr<float>() + step_offset);
      coefs[k].excluded = a.exclude.get(i);
    }
    if (stage == LambStage::kFull) {
      lamb_full(p, dtype, ptrs, coefs);
    } else {
      lamb_stage(a, p, dtype, index, ptrs, coefs);
    }
    staging.write_back();
  }
  if (reads_g)
    for (const at::Tensor& s : a.steps) *s.mutable_data_ptr<float>() += 1.f;
  if (averaging && a.average_count.has_value()) *a.average_count->mutable_data_ptr<int64_t>() += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(lbkernels, CPU, m) {
  m.impl("lamb_", &lamb_op<lamb_cpu, c10::DeviceType::CPU>);
}

}  // namespace lbkernels::cpu
