"""Build of the lbkernels extension.

* CPU torch: a CppExtension (lbkernels._C) from csrc/*.cpp and csrc/cpu/*.cpp.
* CUDA torch with a CUDA toolkit: a CUDAExtension that adds csrc/cuda/*.cu. torch's
  build helper honours TORCH_CUDA_ARCH_LIST (the architectures, e.g. "9.0") and MAX_JOBS
  (parallel compiles, with ninja); nvcc compiles the architectures of one file in
  NVCC_THREADS threads (default 0: as many as CPUs).
* LBK_SKIP_CPP=1: no extension; the pure-PyTorch reference kernels serve every op.

The vectorised CPU loops (csrc/cpu/*_kernel.cpp) are compiled once per CPU capability,
with CPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the matching -m flags, as ATen does; the
host code picks the one the running CPU supports.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
X86 = platform.machine().lower() in ("x86_64", "amd64")
CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma", "-mf16c"],
}
if not X86:
    CAPABILITIES = {"DEFAULT": []}


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    if os.environ.get("LBK_SKIP_CPP") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # lbkernels/__init__.py's MIN_TORCH: say so at build time, not at the first import.
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 11):
        sys.exit(f"lbkernels needs torch >= 2.11 to build, found {torch.__version__}")

    class BuildExt(cpp_extension.BuildExtension):
        """Adds the per-capability objects of the CPU loops to the extension."""

        def build_extensions(self):
            for ext in self.extensions:
                ext.extra_objects = ext.extra_objects + self._capability_objects(ext)
            super().build_extensions()

        def _capability_objects(self, ext):
            objects = []
            headers = rel("csrc/include/lbkernels/*.h") + rel("csrc/cpu/*.h")
            for src in rel("csrc/cpu/*_kernel.cpp"):
                for cap, flags in CAPABILITIES.items():
                    out_dir = os.path.join(self.build_temp, "capability", cap)
                    obj = self.compiler.object_filenames([src], output_dir=out_dir)[0]
                    newest = max(os.path.getmtime(p) for p in [src, *headers])
                    if not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                        # C++20, as cpp_extension compiles the other sources (and CMakeLists.txt).
                        self.compiler.compile(
                            [src], output_dir=out_dir, include_dirs=ext.include_dirs,
                            macros=[("CPU_CAPABILITY", cap), *ext.define_macros],
                            extra_postargs=["-O3", "-std=c++20", "-fPIC", "-Wno-unknown-pragmas", *flags],
                        )
                    objects.append(obj)
            return objects

    include_dirs = [os.path.join(ROOT, "csrc", "include"), *cpp_extension.include_paths()]
    macros = [("LBK_CPU_X86", None)] if X86 else []
    sources = rel("csrc/*.cpp") + [s for s in rel("csrc/cpu/*.cpp") if not s.endswith("_kernel.cpp")]
    cxx = ["-O3", "-fopenmp"]
    cuda_sources = rel("csrc/cuda/*.cu")
    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and cuda_sources and os.environ.get("LBK_SKIP_CUDA") != "1")
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "lbkernels._C", sources + cuda_sources, include_dirs=include_dirs,
            define_macros=macros + [("LBK_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx,
                                "nvcc": ["-O3", f"--threads={os.environ.get('NVCC_THREADS', '0')}"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "lbkernels._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args=cxx, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
