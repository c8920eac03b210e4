# The two commands of the README:  `make demo` (train with LARS on digits) and `make test`.
# Both set up a fresh machine: torch is installed explicitly first (a bare `torch`
# requirement would pull several GB of CUDA wheels), then the package is built against it.
PYTHON ?= python3
# Every package `make` installs is pinned in constraints.txt (versions tested together).
# torch and triton are named there too; TORCH_SPEC / TRITON_SPEC choose another build
# (e.g. TORCH_SPEC=torch==2.13.0+cu128 with PIP_EXTRA_INDEX_URL), installed without the
# pins, so that they may differ from the tested versions.
CONSTRAINTS := constraints.txt
TORCH_SPEC ?= torch
TRITON_SPEC ?= triton
PIP := $(PYTHON) -m pip
PIN := -c $(CONSTRAINTS)
TORCH_PIN := $(if $(filter file,$(origin TORCH_SPEC)),$(PIN))
TRITON_PIN := $(if $(filter file,$(origin TRITON_SPEC)),$(PIN))
# Benchmarks: fixed threads and allocator so runs compare (see bench/RESULTS.md).
BENCH_ENV := OMP_NUM_THREADS=2 MALLOC_MMAP_THRESHOLD_=65536

.PHONY: all install deps test test-fast bench demo cuda-check cmake-check clean

all: test

deps:
	$(PIP) install -q $(PIN) setuptools wheel
	$(PIP) install -q $(TORCH_PIN) "$(TORCH_SPEC)"
	$(PIP) install -q $(PIN) numpy pytest pytest-benchmark pytest-timeout pytest-xdist scikit-learn matplotlib tqdm pyyaml
	$(PIP) install -q $(TRITON_PIN) "$(TRITON_SPEC)" || echo "triton unavailable here: its tests will be skipped"

install: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Test processes (pytest-xdist), each on one thread, the long tests taken first by the
# idle process (worksteal): on an idle 2-core machine 226 s against 374 s in one process
# (283 s with two processes of two threads each). The kernels' split over threads is
# tested apart (python_tests/test_threads.py sets its own count).
TEST_JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist worksteal

# The whole suite, with its 15 slowest tests listed (6.5 min on 2 cores with warm build caches, 11 cold: docs/results.md).
test: install
	$(PYTEST) --durations=15 python_tests

# The edit-compile-test loop: all but the multi-process and end-to-end tests (<= 1 min).
test-fast:
	$(PYTEST) -m "not slow" python_tests

bench: install
	$(BENCH_ENV) $(PYTHON) -m bench

# The GPU path proved on a bare GPU machine (no network, no pip) in under 10 minutes:
# the build, the CUDA tests, the GPU benchmark table, training throughput per method and
# the auto_pick table, every log and figure under OUT (bench/gpu_proof). The dry run
# rehearses every stage a CPU can (~20 s on 2 cores).
OUT ?= build/gpu-proof
.PHONY: gpu-proof gpu-proof-dry-run
gpu-proof:
	$(PYTHON) -m bench.gpu_proof --out $(OUT)

gpu-proof-dry-run:
	$(PYTHON) -m bench.gpu_proof --dry-run --out $(OUT)-dry-run

demo: install
	$(PYTHON) -m lbkernels.train

cuda-check:
	bash csrc/cuda/check.sh

# The Triton kernels compiled for sm_90 (PTX and cubin, no GPU needed) by the Triton the
# GPU machine runs, in a venv of its own under ~/.cache/lbkernels (bench/triton_aot.py).
TRITON_AOT_VERSION := 3.6.0
.PHONY: triton-aot-check
triton-aot-check:
	$(PYTHON) bench/triton_aot.py --triton $(TRITON_AOT_VERSION)

# CMakeLists.txt built against the installed torch and one op run through the result.
cmake-check:
	PYTHON=$(PYTHON) bash csrc/cmake_check.sh

clean:
	rm -rf build lbkernels/_C*.so *.egg-info
