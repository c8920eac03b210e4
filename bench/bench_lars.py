"""pytest-benchmark view of the LARS step: ``pytest bench/bench_lars.py``.

The committed figures come from ``python -m bench`` (``make bench``), which interleaves
the variants in one process; this file gives pytest-benchmark's statistics per variant
and parameter set for the same step functions.
"""

from __future__ import annotations

import pytest
import torch

from bench.params import ANCHOR, PARAM_SETS, SET_VARIANTS, make_params, variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = variants(DEVICE)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("param_set", list(PARAM_SETS))
def test_step(benchmark, param_set, variant):
    only = SET_VARIANTS.get(param_set)
    if only and variant != ANCHOR and not any(o in variant for o in only):
        pytest.skip(f"{param_set} times only the {', '.join(only)} rows")
    params = make_params(PARAM_SETS[param_set](), device=DEVICE)
    opt = VARIANTS[variant](params)
    opt.step()  # lazy state
    benchmark.group = param_set
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def step():
        opt.step()
        sync()

    benchmark.pedantic(step, rounds=15, warmup_rounds=2)
