// What every vectorised CPU loop file (csrc/cpu/*_kernel.cpp) starts with: the vector
// headers, the capability namespace it is compiled into, and the dispatch from a runtime
// dtype to the loop's element type. Included by those files only (they are compiled once
// per capability, with CPU_CAPABILITY set by setup.py / CMakeLists.txt), never by host code.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <lbkernels/cpu_kernels.h>

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined (DEFAULT, AVX2 or AVX512)"
#endif

namespace lbkernels::cpu::CPU_CAPABILITY {
namespace {  // one copy per capability's translation unit: each is built with its own -m flags

using at::vec::Vectorized;

// Calls f(T{}) with the element type of `dtype`; other dtypes are rejected by the host
// code before any loop runs.
template <typename F>
void by_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::Half: return f(c10::Half{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    default: return;
  }
}

}  // namespace
}  // namespace lbkernels::cpu::CPU_CAPABILITY
