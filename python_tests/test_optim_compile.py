"""torch.compile(fullgraph=True) of every optimizer's step (and WeightAverager.update),
against the eager step on a twin model, on every compiled backend."""

from __future__ import annotations

import pytest
import torch

from helpers import HOST_COUNTERS, OPTIMIZERS, batch, compiled_backend_params, model
from lbkernels.optim import WeightAverager

# One row per optimizer class of helpers.OPTIMIZERS, and the noise variant of ExtrapSGD.
ENTRIES = [e for e in OPTIMIZERS if e.name in (
    "LARS", "ShiftedMomentumSGD-lars", "ExtrapSGD-nesterov", "ExtrapSGD-filter-noise", "ExtrapAdam",
    "LAMB")]

# helpers.HOST_COUNTERS: a compiled step dropped the counter's increment (measured: 0
# after 3 compiled steps, 3 after 3 eager ones), so it runs eagerly, a graph break:
# fullgraph=True refuses these steps, and without it every compiled step equals the eager one.


def _backends() -> list:
    """Every compiled backend, and impl="auto" on cpu, which picks the compiled kernels
    there (skipped, as native-cpu, where they are not built)."""
    out = []
    for p in compiled_backend_params():
        out.append(p)
        if tuple(p.values) == ("native", "cpu"):
            out.append(pytest.param("auto", "cpu", marks=p.marks, id="auto-cpu"))
    return out


def _entries() -> list:
    return [pytest.param(e, id=e.name) for e in ENTRIES]


def _same(a, b):
    # The existing LARS parity tolerance (fp32): the compiled step calls the same kernels.
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # inductor compiles each step: 2-9 s on two cores
@pytest.mark.parametrize("impl,device", _backends())
@pytest.mark.parametrize("entry", _entries())
def test_compiled_step_matches_eager(entry, impl, device):
    # Two groups (the second with the entry's other hyper-parameters, LARS's excluded from
    # the ratio) and a tensor lr, as a captured or compiled step takes it.
    def make(m):
        ps = list(m.parameters())
        return entry.make([{"params": ps[:2]}, {"params": ps[2:], **entry.group_overrides}],
                          impl=impl, lr=torch.tensor(0.05, device=device))

    a, b = model(device=device), model(device=device)
    oa, ob = make(a), make(b)
    counted = entry.name in HOST_COUNTERS
    if counted:
        x, y = batch(0, device=device)
        torch.nn.functional.cross_entropy(b(x), y).backward()
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(ob.step, fullgraph=True, backend="eager")()
        torch._dynamo.reset()
        ob.zero_grad()
    # Those with a counter recompile as it changes: aot_eager spares them inductor's code
    # generation (6-7 s each on two cores).
    compiled = torch.compile(ob.step, fullgraph=not counted,
                             backend="aot_eager" if counted else "inductor")
    try:
        for t in range(3):
            x, y = batch(t, device=device)
            for m, opt, step in ((a, oa, oa.step), (b, ob, compiled)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                step()
    finally:
        torch._dynamo.reset()
    _same(a.parameters(), b.parameters())
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for k in sa:
        _same([sa[k][n] for n in sorted(sa[k])], [sb[k][n] for n in sorted(sb[k])])


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", _backends())
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_compiled_weight_averager_update_matches_eager(impl, device, mode):
    a, b = model(device=device), model(device=device)
    avg_a = WeightAverager(a, mode=mode, decay=0.8, impl=impl)
    avg_b = WeightAverager(b, mode=mode, decay=0.8, impl=impl)
    compiled = torch.compile(avg_b.update, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    try:
        for _ in range(3):
            with torch.no_grad():
                for p, q in zip(a.parameters(), b.parameters()):
                    d = torch.randn(p.shape, generator=g).to(device)
                    p.add_(d)
                    q.add_(d)
            avg_a.update()
            compiled()
    finally:
        torch._dynamo.reset()
    assert avg_a.n_averaged == avg_b.n_averaged == 3
    _same(avg_a.averages, avg_b.averages)
