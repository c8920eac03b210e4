"""No optimizer step reads a tensor on the host: a read would stall the GPU and stop
CUDA-graph capture. On CPU the reads are caught by making every host-reading method of
``torch.Tensor`` raise while ``step()`` runs; on a GPU, by torch's sync debug mode."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lbkernels.distributed import PostLocalSGD
from lbkernels.optim import LARS, ShiftedMomentumSGD, WeightAverager
from helpers import OPTIMIZERS, batch, compiled_backend_params, model, optim_backend_params, train

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


def _refuse(name):
    def read(*args, **kwargs):
        raise AssertionError(f"host sync in step(): Tensor.{name}()")

    return read


@contextlib.contextmanager
def no_host_reads():
    with pytest.MonkeyPatch.context() as mp:
        for name in HOST_READS:
            mp.setattr(torch.Tensor, name, _refuse(name))
        yield


def guard_steps(opt):
    """Make every ``opt.step()`` (also the one GradScaler.step calls) refuse host reads."""
    step = opt.step

    def guarded(*args, **kwargs):
        with no_host_reads():
            return step(*args, **kwargs)

    opt.step = guarded


def test_the_guard_catches_host_reads():
    # The check itself can fail: each patched method raises inside the block.
    t = torch.ones(())
    with no_host_reads():
        for read in (t.item, lambda: bool(t), lambda: float(t), t.tolist, t.cpu):
            with pytest.raises(AssertionError, match="host sync"):
                read()
    assert t.item() == 1.0  # and only there


each_optimizer = pytest.mark.parametrize("entry", OPTIMIZERS, ids=[e.name for e in OPTIMIZERS])


@each_optimizer
@pytest.mark.parametrize("impl,device", optim_backend_params())
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
def test_step_reads_nothing_on_the_host(entry, impl, device, scaler):
    m = model(device=device)
    opt = entry.make([{"params": list(m.parameters())[:2]},
                      {"params": list(m.parameters())[2:], **entry.group_overrides}], impl=impl)
    guard_steps(opt)
    gs = torch.amp.GradScaler(device, init_scale=2.0**10) if scaler else None
    # Step 1 skipped under the scaler (a non-finite loss), later steps taken.
    train(m, opt, 4, scaler=gs, inf_at=(1,) if scaler else ())
    opt.param_groups[0]["lr"] *= 0.5  # an edited group is checked again, still without a read
    train(m, opt, 1, scaler=gs)


@each_optimizer
def test_tensor_lr_and_fused_averager_read_nothing_on_the_host(entry):
    m = model()
    opt = entry.make(m.parameters(), lr=torch.tensor(0.05))
    if isinstance(opt, (LARS, ShiftedMomentumSGD)):
        WeightAverager(m, fused_with=opt)
    guard_steps(opt)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train(m, opt, 3, scaler=gs, inf_at=(1,))
    opt.param_groups[0]["lr"].fill_(0.02)  # as an LR scheduler updates a tensor lr
    train(m, opt, 1, scaler=gs)


@each_optimizer
def test_post_local_sgd_step_reads_nothing_on_the_host(entry):
    m = model()
    opt = PostLocalSGD(entry.make(m.parameters()), switch_step=1, period=2)  # one process
    guard_steps(opt)
    train(m, opt, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10), inf_at=(2,))
    # The wrapper takes no found_inf: the scaler itself skipped step 2 (not calling step()).
    assert opt.step_count == 3


@each_optimizer
@pytest.mark.parametrize("impl,device", [p for p in compiled_backend_params() if p.values[1] == "cuda"])
def test_cuda_step_does_not_synchronize(entry, impl, device):
    m = model(device=device)
    opt = entry.make(m.parameters(), impl=impl, lr=torch.tensor(0.05, device=device))
    x, y = batch(0, device=device)
    # What GradScaler.step hands the optimizer, set here so that only step() is watched.
    opt.grad_scale = torch.full((), 2.0**10, device="cuda")
    opt.found_inf = torch.zeros((), device="cuda")
    for _ in range(2):  # the second step runs with every state already allocated
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(m(x), y) * 2.0**10).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
