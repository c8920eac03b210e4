"""Helpers for data-parallel jobs (``torchrun``, gloo on CPU, NCCL on GPU)."""

from ..optim.extrap_hook import extrap_allreduce_hook
from .accumulation import StepStats, accumulate_gradients
from .async_sim import AsyncSimulator
from .delayed import DelayedGradients, delayed_allreduce_hook
from .grad_norms import GradNorms, grad_norms_hook
from .post_local import PostLocalSGD, post_local_hook
from .swap import SWAP
from .worker_mean import average_parameters

__all__ = ["StepStats", "accumulate_gradients", "AsyncSimulator", "DelayedGradients", "delayed_allreduce_hook",
           "average_parameters", "PostLocalSGD", "post_local_hook", "extrap_allreduce_hook", "SWAP",
           "GradNorms", "grad_norms_hook"]
