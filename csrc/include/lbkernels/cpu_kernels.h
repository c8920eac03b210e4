// Interface of the vectorised CPU loops, compiled once per CPU capability (DEFAULT,
// AVX2, AVX512) into namespaces of that name; the host code picks the one the CPU
// supports. Only plain structs cross this boundary, so the per-capability translation
// units include the vector headers and nothing heavier (3 s to compile, not 20).
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>

#include <lbkernels/extrap_math.h>
#include <lbkernels/lamb_math.h>
#include <lbkernels/math.h>

namespace lbkernels::cpu {

// Raw view of one tensor triple; every pointer addresses `numel` elements laid out
// identically in memory (same strides, dense), so the loops run in memory order.
struct TensorPtrs {
  void* w;
  const void* g;
  void* buf;  // null without momentum
  int64_t numel;
  // lars_sgd_ with averaging folded in: the average of w (fp32, or fp64 for fp64 params),
  // same layout; null otherwise.
  void* avg = nullptr;
};

// A range [begin, end) of one tensor's elements; at most kChunk elements.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

constexpr int64_t kChunk = 65536;

// Per-tensor constants of one SGD-family update (double covers both opmath types).
struct TensorCoefs {
  double r = 1;     // direction scale (trust ratio)
  double wd = 0;    // weight decay added to the gradient
  double pre = 1;   // lr for momentum_style="paper", else 1
  double lr = 0;    // step applied to u
  bool first = false;     // first momentum step: buf = d
  bool excluded = false;  // LARS-excluded: r = 1, no norms needed
  // Squared norms given by the op's norm_sq (of w and of the still-scaled g), in the
  // arithmetic type, or for w by lars_sgd_'s norm cache (the unrounded double the last
  // update summed); < 0: not given, the loops sum that one.
  double given_w2 = -1, given_g2 = -1;
  bool needs_norms() const { return !excluded && (given_w2 < 0 || given_g2 < 0); }
};

struct SgdParams {
  double grad_scale = 1;  // divides the gradient when has_scale
  bool has_scale = false;
  double momentum = 0;
  double dampening = 0;
  bool has_momentum = false;
  bool nesterov = false;
  // Weight averaging folded into the update (TensorPtrs.avg): avg += r * (w - avg) on the
  // stored w, with r rounded once to each arithmetic type, as AverageParams.
  double average_r64 = 0;
  float average_r32 = 0;
};

struct LarsParams {
  double lr, weight_decay, trust_coefficient, eps;
  bool clip, zero_norm_decay, paper;
};

// Fills c.r/c.wd/c.pre/c.lr of one tensor from its sums of squares (of w and of the
// still-scaled g), or from c.given_w2 / c.given_g2 where those are given. Called by the host for multi-chunk tensors and by the kernels for
// tensors that fit in one chunk, so both paths compute the same coefficients.
inline void lars_coefs(double sum_w2, double sum_g2, const LarsParams& lp, const SgdParams& sp,
                       TensorCoefs& c) {
  if (c.given_w2 >= 0) sum_w2 = c.given_w2;
  if (c.given_g2 >= 0) sum_g2 = c.given_g2;
  const double n_w = std::sqrt(sum_w2);
  const double n_g = sp.has_scale ? std::sqrt(sum_g2) / sp.grad_scale : std::sqrt(sum_g2);
  const LarsScale<double> s = lars_scale<double>(n_w, n_g, lp.lr, lp.weight_decay,
                                                 lp.trust_coefficient, lp.eps, lp.clip,
                                                 lp.zero_norm_decay, c.excluded);
  c.r = s.r;
  c.wd = s.wd;
  c.pre = lp.paper ? lp.lr : 1.0;
  c.lr = lp.paper ? 1.0 : lp.lr;
}

// Weight of the new snapshot in one averaging update, rounded once to each arithmetic
// type on the host (the reference rounds it the same way): fp32 averages use r32,
// fp64 averages r64.
struct AverageParams {
  double r64;
  float r32;
};

#define LBK_DECLARE_CPU_KERNELS(NS)                                                        \
  namespace NS {                                                                           \
  /* out[2*c] = sum(w^2), out[2*c+1] = sum(g^2) over chunk c (0 for a null pointer). */     \
  void sum_squares(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,  \
                   int64_t c0, int64_t c1, double* out);                                   \
  /* The update of chunks [c0, c1) with the coefficients of their tensors; new_w2 (null \
     or one per chunk, given with lars_sgd_'s norm cache): new_w2[c] = sum(new w^2) of   \
     chunk c, summed as sum_squares sums it, for the tensors not excluded (other entries \
     untouched). */                                                                        \
  void sgd_update(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,   \
                  int64_t c0, int64_t c1, const TensorCoefs* coefs, const SgdParams& p,    \
                  double* new_w2);                                                         \
  /* Whole-tensor chunks: norms, coefficients and update in one visit (cache-hot);      \
     new_w2 as sgd_update's. */                                                            \
  void lars_whole(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks,   \
                  int64_t c0, int64_t c1, TensorCoefs* coefs, const LarsParams& lp,        \
                  const SgdParams& p, double* new_w2);                                     \
  /* avg += r * (w - avg) over chunks [c0, c1): TensorPtrs.w is the average (fp32, or  \
     fp64 for fp64 params), TensorPtrs.g the param, of dtype param_dtype. */           \
  void average_update(c10::ScalarType param_dtype, const TensorPtrs* tensors,             \
                      const Chunk* chunks, int64_t c0, int64_t c1, const AverageParams& p); \
  /* w = sum / k over chunks [c0, c1): TensorPtrs.w the param, TensorPtrs.g its segment \
     of the flat sum, both of dtype `dtype`; arithmetic in fp32 (fp64 for fp64). */      \
  void worker_mean(c10::ScalarType dtype, const TensorPtrs* tensors, const Chunk* chunks, \
                   int64_t c0, int64_t c1, double k);                                      \
  /* mean_sum_squares_: chunks [c0, c1) of the flat buffer (Chunk.begin/end: offsets   \
     into it): x = x / k, partial[c] = the sum of squares of chunk c's stored quotients. */ \
  void mean_sum_squares(c10::ScalarType dtype, void* flat, const Chunk* chunks, int64_t c0, \
                        int64_t c1, double k, double* partial);                            \
  }

LBK_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(LBK_CPU_X86)
LBK_DECLARE_CPU_KERNELS(AVX2)
LBK_DECLARE_CPU_KERNELS(AVX512)
#endif

// --- extrap_sgd_ / extrap_adam_ (docs/algorithms.md section 2) ---------------------------------

// Raw view of one tensor of an extrapolated step; every pointer addresses `numel`
// elements laid out identically (row-major for the noise variants).
struct ExtrapPtrs {
  void* w;         // params: the extrapolated point (written)
  void* x;         // anchors (written)
  void* s1;        // momentum buffer / exp_avg (null without momentum)
  void* s2;        // exp_avg_sq (extrap_adam_ only)
  const void* g;   // all-reduced gradient
  const void* gk;  // local gradient (null: g)
  int64_t numel;
  int64_t row;     // elements per output filter ("filter" variant; numel for 0-d/1-d)
  uint32_t index;  // position in the op's lists: the Philox stream of the tensor
};

struct ExtrapParams {
  SgdParams sgd;  // grad_scale, momentum, nesterov (dampening 0)
  double extrap_lr = 0;
  Extrapolation kind = Extrapolation::kPastGrad;
  double noise_scale = 0;
  uint64_t seed = 0, offset = 0;
  bool has_local = false;
};

// Per-tensor constants of extrap_adam_, from its step counter (double, as torch's floats).
struct AdamTensorCoefs {
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t)
};

struct AdamParams {
  double grad_scale = 1, weight_decay = 0, decay = 1, beta1 = 0.9, beta2 = 0.999, eps = 1e-8,
         extrap_lr = 0;
  bool has_scale = false, has_local = false, decoupled = false;
};

#define LBK_DECLARE_EXTRAP_CPU_KERNELS(NS)                                                  \
  namespace NS {                                                                           \
  /* extrap_sgd_ over chunks [c0, c1). A chunk of a filter-variant tensor holds whole   \
     filters. whole: every chunk is a whole tensor whose LARS coefficients (when not    \
     excluded) are computed here from its norms; else coefs are ready. */               \
  void extrap_sgd(c10::ScalarType dtype, const ExtrapPtrs* tensors, const Chunk* chunks,   \
                  int64_t c0, int64_t c1, TensorCoefs* coefs, const LarsParams& lp,        \
                  const ExtrapParams& p, bool whole);                                      \
  /* extrap_adam_ over chunks [c0, c1). */                                                 \
  void extrap_adam(c10::ScalarType dtype, const ExtrapPtrs* tensors, const Chunk* chunks,  \
                   int64_t c0, int64_t c1, const AdamTensorCoefs* coefs, const AdamParams& p); \
  }

LBK_DECLARE_EXTRAP_CPU_KERNELS(DEFAULT)
#if defined(LBK_CPU_X86)
LBK_DECLARE_EXTRAP_CPU_KERNELS(AVX2)
LBK_DECLARE_EXTRAP_CPU_KERNELS(AVX512)
#endif

// --- lamb_ (docs/algorithms.md section 7) --------------------------------------------------

// Raw view of one tensor of a LAMB step; every pointer addresses `numel` elements laid out
// identically in memory.
struct LambPtrs {
  void* w;
  const void* g;
  void* m;
  void* v;
  void* avg;  // the folded average (fp32, or fp64 for fp64 params); null without
  int64_t numel;
};

// Per-tensor state of one LAMB step: the step count the bias corrections use, the trust
// ratio (1 until the norms are known, and for excluded tensors).
struct LambTensorCoefs {
  double t = 1;
  double r = 1;
  bool excluded = false;
};

struct LambParams {
  LambOptions o;
  double grad_scale = 1, clip = 1;  // the divisors of the gradient (when o.has_scale, o.has_clip)
  AverageParams average{0, 0};      // the folded averaging's weight (when LambPtrs.avg)
};

// The trust ratio of one tensor from its sums of squares of w and u. Called by the host
// for multi-chunk tensors and by the kernels for whole ones, so both compute the same.
inline void lamb_set_ratio(double sum_w2, double sum_u2, const LambParams& p, LambTensorCoefs& c) {
  c.r = lamb_ratio<double>(std::sqrt(sum_w2), std::sqrt(sum_u2), p.o.has_max_trust,
                           p.o.max_trust, p.o.clip, c.excluded);
}

// What one call of the lamb loop does to its chunks.
enum class LambPass : int32_t {
  kNorms,  // pass 1: out[2*c] = sum(w^2), out[2*c+1] = sum(u^2) of chunk c; fp32/fp64 store m, v
  kWrite,  // pass 2: write w (and m, v, avg) with the tensor's ratio, chunks in reverse order
  kWhole,  // both on whole-tensor chunks, the ratio computed between them (cache-hot)
  kMoments,  // stage "moments": kNorms storing m, v of every dtype (rounded if 16-bit)
  kUpdate,   // stage "update": kWrite from the stored m, v of every dtype, never recomputed
};

#define LBK_DECLARE_LAMB_CPU_KERNELS(NS)                                                   \
  namespace NS {                                                                           \
  void lamb(c10::ScalarType dtype, const LambPtrs* tensors, const Chunk* chunks, int64_t c0, \
            int64_t c1, LambTensorCoefs* coefs, const LambParams& p, LambPass pass,        \
            double* out);                                                                  \
  }

LBK_DECLARE_LAMB_CPU_KERNELS(DEFAULT)
#if defined(LBK_CPU_X86)
LBK_DECLARE_LAMB_CPU_KERNELS(AVX2)
LBK_DECLARE_LAMB_CPU_KERNELS(AVX512)
#endif

}  // namespace lbkernels::cpu
