"""The DDP comm hook of extrapolated SGD: capture each worker's local gradient, then all-reduce.

It lives beside the optimizers it serves (``attach`` registers it), so that
``lbkernels.optim`` never imports ``lbkernels.distributed``, whose helpers build on the
optimizers; ``lbkernels.distributed.extrap_allreduce_hook`` is this function.

Usage (what :meth:`lbkernels.optim.ExtrapSGD.attach` does)::

    ddp = DistributedDataParallel(model)
    opt = ExtrapSGD(model.parameters(), lr=0.4)
    ddp.register_comm_hook(opt, extrap_allreduce_hook)   # or: opt.attach(ddp)
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects
# (dist.GradBucket, torch.futures.Future[torch.Tensor]), not as strings.
import torch
import torch.distributed as dist


def extrap_allreduce_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: copy the bucket's local gradients ``g^k`` into the optimizer's
    local-gradient buffers, then average the bucket over the process group as DDP's
    default hook does (divide by the group's size, all-reduce, return the future).

    ``state`` is the :class:`~lbkernels.optim.ExtrapSGD` or
    :class:`~lbkernels.optim.ExtrapAdam` that steps the model; its ``process_group``
    (set by ``attach``) is the group averaged over, the default group when None. The
    parameter-to-gradient mapping is read from the bucket at every call, because DDP
    rebuilds its buckets after the first iteration. The copy adds 8 bytes per fp32
    parameter (read g, write g^k) to the backward; the buffers are allocated once.
    """
    state.capture_local_grads(bucket.parameters(), bucket.gradients())
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.div_(group.size())
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
