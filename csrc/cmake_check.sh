#!/usr/bin/env bash
# Build check of CMakeLists.txt (make cmake-check, python_tests/test_cmake_build.py).
#
#  1. Configures and builds CMakeLists.txt against the installed torch (one configuration,
#     Release, -j2). The library is cached under ${LBK_CACHE_DIR:-~/.cache/lbkernels},
#     keyed on the content of CMakeLists.txt and csrc/, the torch version and the cmake
#     and compiler versions: an unchanged tree is not rebuilt (a build takes minutes on
#     two cores), a changed one is.
#  2. Loads the built library into a Python process that imports lbkernels without its
#     own compiled library (LBK_DISABLE_NATIVE=1: with both loaded, the later one's CPU
#     kernels override the other's, and the check would not know whose ran), checks
#     that it serves every op of lbkernels/_library.py on the CPU, and runs extrap_sgd_
#     (LARS, Nesterov momentum, past-gradient extrapolation) through it against the
#     reference kernel in fp64.
#
# Exits 0 with "cmake not found: skipped" where there is no cmake; non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
source csrc/check_common.sh

CMAKE=${CMAKE:-cmake}
skip_without "$CMAKE" cmake

torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
key=$({
  find CMakeLists.txt csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  echo "torch $torch_version"
  "$CMAKE" --version | head -n 1
  "${CXX:-c++}" --version | head -n 1
} | sha256sum | cut -c 1-16)
lib="$cache/cmake-$key/liblbkernels.so"

if [ -f "$lib" ]; then
  echo "build: cached ($lib)"
else
  mkdir -p "$cache"
  build=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$build"' EXIT
  prefix=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
  start=$SECONDS
  "$CMAKE" -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >"$build/configure.log" 2>&1 \
    || { cat "$build/configure.log" >&2; exit 1; }
  "$CMAKE" --build "$build" -j 2 >"$build/build.log" 2>&1 || { cat "$build/build.log" >&2; exit 1; }
  # Published by a rename, so that a concurrent run sees the whole library or none; older
  # keys' builds are removed.
  mkdir -p "$build/out"
  cp "$build/liblbkernels.so" "$build/out/"
  find "$cache" -maxdepth 1 -name 'cmake-*' ! -name "cmake-$key" -exec rm -rf {} +
  mv -T "$build/out" "$cache/cmake-$key" 2>/dev/null || [ -f "$lib" ]
  echo "build: CMakeLists.txt built against torch $torch_version in $((SECONDS - start)) s"
fi

LBK_DISABLE_NATIVE=1 "$PYTHON" - "$lib" <<'EOF'
import sys

import torch

import lbkernels
from lbkernels import _library, ops

assert lbkernels.native_unavailable_reason is not None, "the package's own library is loaded"
names = list(_library.SCHEMAS)
assert not any(_library.has_native_kernel(n, "cpu") for n in names)
torch.ops.load_library(sys.argv[1])
missing = [n for n in names if not _library.has_native_kernel(n, "cpu")]
assert not missing, f"the CMake-built library registers no CPU kernel for {missing}"
print(f"load: CPU kernels for {len(names)} ops registered by {sys.argv[1]}")

# Shapes: a matrix, one tensor over 65,536 elements (several chunks: the norms are summed
# across chunks), a scalar and a LARS-excluded bias.
g = torch.Generator().manual_seed(0)
shapes = [(3, 70), (130_000,), (), (5,)]
x = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
local = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
state = {}
for impl in ("native", "reference"):
    params, anchors = [t + 0.5 for t in x], [t.clone() for t in x]
    bufs = [0.1 * t for t in x]
    ops.extrap_sgd_(params, anchors, bufs, grads, local, [False, False, False, True], lr=0.1,
                    extrap_lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True, lars=True,
                    impl=impl)
    state[impl] = params + anchors + bufs
# fp64, one step: the LARS norms summed in another order differ by at most n * 2^-53
# = 1.5e-11 relative (recursive summation's bound, n = 130,000), carried into a step of
# size ~0.1; multiply-adds contracted into FMAs differ by a few ulps (~1e-16). rtol 1e-10
# is above both; a wrong rule is off by the order of the step.
for a, b in zip(state["native"], state["reference"]):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
diff = max((a - b).abs().max().item() for a, b in zip(state["native"], state["reference"]))
print(f"extrap_sgd_: the CMake-built kernel matches the reference in fp64 (max |diff| {diff:.1e})")
EOF
echo "CMake build check passed"
