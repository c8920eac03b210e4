// lbkernels.HeldLists, and the "_held" ops that take one in place of their leading tensor
// lists (docs/algorithms.md section 1.2). Host code for every device: the CUDA build
// compiles it too.
//
// Why: a step over many small tensors spends most of its host time walking per-tensor
// metadata that the forward and backward passes have evicted from the caches. Measured on
// 2000 tensors of 1000 fp32 elements, each step preceded by another optimizer's (2
// threads, medians): building [p.grad for p in params] in Python takes 0.9-1.2 ms, the
// op's conversion and checks of its three Tensor[] arguments ~1.4 ms (0.8 ms warm), the
// loops ~2.8 ms. A bucket that holds its params and state lists here passes them to the op
// without any conversion, and gathers the params' grads itself in stages (every
// TensorImpl, then every autograd meta, then every grad's TensorImpl and storage), so that
// the misses of 2000 tensors overlap instead of following each other one chain at a time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

namespace lbkernels {
namespace {

// One optimizer bucket's params and per-param state lists, in the order the op takes them
// after params and grads, and the params' grads gathered for the next op call. Held as the
// c10::List an op's Tensor[] argument is, built once: a call pushes each as an IValue (one
// pointer copy), where building a list from a vector copies every tensor handle (an atomic
// refcount update per tensor, 2000 tensors per list in the case measured above).
struct HeldLists : torch::CustomClassHolder {
  c10::List<at::Tensor> params;
  std::vector<c10::List<at::Tensor>> lists;
  std::vector<at::Tensor> grads;  // filled by gather_grads, emptied by the op that uses them

  HeldLists(std::vector<at::Tensor> params_, std::vector<std::vector<at::Tensor>> lists_) {
    for (size_t k = 0; k < lists_.size(); ++k)
      TORCH_CHECK_VALUE(lists_[k].empty() || lists_[k].size() == params_.size(), "HeldLists: list ",
                        k, " has ", lists_[k].size(), " tensors for ", params_.size(), " params");
    params = to_list(std::move(params_));
    lists.reserve(lists_.size());
    for (auto& l : lists_) lists.push_back(to_list(std::move(l)));
  }

  // Gathers every param's grad. False, with nothing kept, when one is missing or is not a
  // dense tensor of its param's dtype, shape and device: the caller then steps through the
  // list op, which skips params without grads and refuses bad ones with its messages.
  bool gather_grads() {
    grads.clear();
    const c10::List<at::Tensor>& params = this->params;  // const: [] gives a const at::Tensor&
    const size_t n = params.size();
    for (size_t i = 0; i < n; ++i) __builtin_prefetch(params[i].unsafeGetTensorImpl());
    metas_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      metas_[i] = params[i].unsafeGetTensorImpl()->autograd_meta();
      if (metas_[i] != nullptr) __builtin_prefetch(metas_[i]);
    }
    grads.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (metas_[i] == nullptr) return release_false();
      grads.push_back(metas_[i]->grad());  // the refcount update misses in parallel
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& g = grads[i];
      if (!g.defined() || g.layout() != c10::kStrided || !g.has_storage()) return release_false();
      __builtin_prefetch(g.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl());
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& g = grads[i];
      const at::Tensor& p = params[i];
      if (g.scalar_type() != p.scalar_type() || g.device() != p.device() || g.sizes() != p.sizes())
        return release_false();
    }
    return true;
  }

  void release() { grads.clear(); }

 private:
  static c10::List<at::Tensor> to_list(std::vector<at::Tensor>&& v) {
    c10::List<at::Tensor> l;
    l.reserve(v.size());
    for (at::Tensor& t : v) l.push_back(std::move(t));
    return l;
  }
  bool release_false() {
    release();
    return false;
  }
  std::vector<c10::AutogradMetaInterface*> metas_;
};

// The boxed kernel of "<target>held_": the stack holds the held op's arguments, a HeldLists
// and one bool, `exclude` for every param of the bucket; they are replaced by (params,
// grads, lists..., [exclude] * n) and the target op is called with the rest unchanged, so
// every check and kernel of the target applies as it is. (A list argument of a call that
// also passes a script object is walked element by element by torch's Python op call:
// 2000 bools cost ~0.3 ms, hence the one bool.) The gathered grads are released when the
// call returns or throws.
template <const char* kTarget>
void forward_held(const c10::OperatorHandle& held_op, torch::jit::Stack* stack) {
  static const c10::OperatorHandle target =
      c10::Dispatcher::singleton().findSchemaOrThrow(kTarget, "");
  const size_t n_args = held_op.schema().arguments().size();
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(n_args);
  const c10::intrusive_ptr<HeldLists> held = first->toCustomClass<HeldLists>();
  struct Release {
    HeldLists& h;
    ~Release() { h.release(); }
  } release{*held};
  TORCH_CHECK_VALUE(held->params.empty() || held->grads.size() == held->params.size(),
                    held_op.schema().name(), ": gather_grads() must succeed before the call");
  // The target takes (params, grads, lists..., exclude, the held op's arguments after its
  // two): a HeldLists with another count of lists would shift every argument after them.
  const auto n_lists = static_cast<int64_t>(target.schema().arguments().size()) -
                       static_cast<int64_t>(n_args - 2) - 3;
  TORCH_CHECK_VALUE(static_cast<int64_t>(held->lists.size()) == n_lists, held_op.schema().name(),
                    ": the HeldLists holds ", held->lists.size(), " lists, ", kTarget, " takes ",
                    n_lists, " after params and grads");
  const bool exclude = (first + 1)->toBool();
  std::vector<c10::IValue> lists;
  lists.reserve(3 + held->lists.size());
  lists.emplace_back(held->params);
  c10::List<at::Tensor> grads;
  grads.reserve(held->grads.size());
  for (at::Tensor& g : held->grads) grads.push_back(std::move(g));
  held->grads.clear();
  lists.emplace_back(std::move(grads));
  for (const auto& l : held->lists) lists.emplace_back(l);
  c10::List<bool> flags;
  flags.resize(held->params.size(), exclude);
  lists.emplace_back(std::move(flags));
  *first = std::move(lists[0]);
  *(first + 1) = std::move(lists[1]);
  stack->insert(first + 2, std::make_move_iterator(lists.begin() + 2),
                std::make_move_iterator(lists.end()));
  target.callBoxed(stack);
}

constexpr char kLarsSgd[] = "lbkernels::lars_sgd_";

}  // namespace

// NOLINTNEXTLINE(cert-err58-cpp): registered at load, like the ops' kernels.
static const auto held_lists_class =
    torch::class_<HeldLists>("lbkernels", "HeldLists")
        .def(torch::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>>())
        .def("gather_grads", &HeldLists::gather_grads)
        .def("release", &HeldLists::release);

// Whatever the device: the target op dispatches on the tensors it is given.
TORCH_LIBRARY_IMPL(lbkernels, CompositeImplicitAutograd, m) {
  m.impl("lars_sgd_held_", torch::CppFunction::makeFromBoxedFunction<&forward_held<kLarsSgd>>());
}

}  // namespace lbkernels
