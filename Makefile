# The two commands of the README:  `make demo` (train with LARS on digits) and `make test`.
# Both set up a fresh machine: torch is installed explicitly first (a bare `torch`
# requirement would pull several GB of CUDA wheels), then the package is built against it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PIP := $(PYTHON) -m pip
# Benchmarks: fixed threads and allocator so runs compare (see bench/RESULTS.md).
BENCH_ENV := OMP_NUM_THREADS=2 MALLOC_MMAP_THRESHOLD_=65536

.PHONY: all install deps test test-fast bench demo cuda-check clean

all: test

deps:
	$(PIP) install -q "setuptools>=77" wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q numpy pytest pytest-benchmark pytest-timeout scikit-learn matplotlib tqdm pyyaml
	$(PIP) install -q "$(TRITON_SPEC)" || echo "triton unavailable here: its tests will be skipped"

install: deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest -q python_tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" python_tests

bench: install
	$(BENCH_ENV) $(PYTHON) -m bench

demo: install
	$(PYTHON) -m lbkernels.train

cuda-check:
	bash csrc/cuda/check.sh

clean:
	rm -rf build lbkernels/_C*.so *.egg-info
