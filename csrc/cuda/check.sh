#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines without a GPU (make cuda-check, CI).
#
#  1. The kernels (check/kernels_check.cu instantiates every kernel for float, double,
#     __half and __nv_bfloat16) to PTX for sm_80 and sm_90, every nvcc warning an error;
#     then ptxas on that PTX, where a register spill or any local memory is an error
#     (the 3.5 KB argument struct copied to local memory would be one).
#  2. The filter-piece layout of extrap_sgd_ (check/filter_pieces_check.cu), built for
#     the host and run against a brute-force enumeration.
#  3. The host/registration files (every csrc/cuda/*.cu, as setup.py builds them), compiled to an
#     object against the installed torch's headers with the flags torch's
#     CUDAExtension uses, when torch imports.
#     A CPU-only torch ships the c10/cuda headers but not the CMake-generated
#     c10/cuda/impl/cuda_cmake_macros.h (export macros only); the check then defines
#     C10_CUDA_NO_CMAKE_CONFIGURE_FILE to do without it.
#
# A passing run is cached under ${LBK_CACHE_DIR:-~/.cache/lbkernels}, keyed on the content
# of csrc/cuda/, csrc/include/ and csrc/check_common.sh, the nvcc, host compiler and torch
# versions: unchanged sources are not compiled again (minutes on two cores), changed ones are.
#
# Exits 0 with "nvcc not found: skipped" where there is no nvcc; non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/../.."
source csrc/check_common.sh

NVCC=${NVCC:-nvcc}
skip_without "$NVCC" nvcc
PTXAS="$(dirname "$(command -v "$NVCC")")/ptxas"
[ -x "$PTXAS" ] || PTXAS=ptxas

key=$({
  find csrc/cuda csrc/include csrc/check_common.sh -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  "$NVCC" --version
  # nvcc's host compiler (warnings are errors here, so its version decides a pass too)
  "${NVCC_CCBIN:-g++}" --version 2>/dev/null || echo "no host compiler"
  # the version from the package metadata: importing torch costs seconds on two cores
  "$PYTHON" -c 'from importlib.metadata import version; print("torch", version("torch"))' \
    2>/dev/null || echo "no torch"
} | sha256sum | cut -c 1-16)
log="$cache/cuda-check-$key.log"
if [ -f "$log" ]; then
  echo "cached: these sources passed with this nvcc and torch ($log)"
  cat "$log"
  exit 0
fi

check() {
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# What torch.utils.cpp_extension passes to nvcc for a CUDAExtension (half/bfloat16
# operators off, relaxed constexpr): the check compiles what the build compiles.
TORCH_NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
STRICT=(-Werror all-warnings -Xcompiler -Wall,-Wextra)

echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"
for arch in 80 90; do
  "$NVCC" -std=c++17 -O3 "${TORCH_NVCC_FLAGS[@]}" "${STRICT[@]}" -Icsrc/include \
    -ptx -arch=sm_$arch -o "$out/kernels_sm$arch.ptx" csrc/cuda/check/kernels_check.cu
  "$PTXAS" -arch=sm_$arch -O3 --warn-on-spills --warn-on-local-memory-usage \
    --warning-as-error -o "$out/kernels_sm$arch.cubin" "$out/kernels_sm$arch.ptx"
  echo "kernels: PTX and SASS for sm_$arch OK ($(grep -c '\.entry' "$out/kernels_sm$arch.ptx") kernels)"
done

# The filter-piece layout of extrap_sgd_ (integer arithmetic shared by host and device),
# built for the host and run: it needs no GPU.
"$NVCC" -std=c++17 -O2 "${TORCH_NVCC_FLAGS[@]}" "${STRICT[@]}" -Icsrc/include -arch=sm_90 \
  -o "$out/filter_pieces_check" csrc/cuda/check/filter_pieces_check.cu
"$out/filter_pieces_check"

if ! includes=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))" 2>/dev/null); then
  echo "host file: skipped (torch does not import with $PYTHON)"
  exit 0
fi
host_flags=()
while IFS= read -r dir; do host_flags+=(-isystem "$dir"); done <<<"$includes"
first_include=$(head -n 1 <<<"$includes")
if [ ! -f "$first_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  host_flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
# torch's headers need C++20 (the extension build passes -std=c++20 as well).
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__)')
for src in csrc/cuda/*.cu; do
  "$NVCC" -std=c++20 -O3 "${TORCH_NVCC_FLAGS[@]}" "${STRICT[@]}" -Icsrc/include "${host_flags[@]}" \
    -arch=sm_90 -c -o "$out/$(basename "$src" .cu).o" "$src"
  echo "host file: $src compiled against torch $torch_version"
done
echo "CUDA compile check passed"
}

mkdir -p "$cache"
partial=$(mktemp "$cache/cuda-check.XXXXXX")
trap 'rm -f "$partial"' EXIT
(check) | tee "$partial"
find "$cache" -maxdepth 1 -name 'cuda-check-*.log' -delete
mv "$partial" "$log"
