"""Helpers for data-parallel jobs (``torchrun``, gloo on CPU, NCCL on GPU)."""

from .accumulation import StepStats, accumulate_gradients
from .async_sim import AsyncSimulator
from .worker_mean import average_parameters
from .delayed import DelayedGradients, delayed_allreduce_hook

__all__ = ["StepStats", "accumulate_gradients", "AsyncSimulator", "DelayedGradients", "delayed_allreduce_hook"]
__all__ += ["average_parameters"]
from .post_local import PostLocalSGD, post_local_hook  # noqa: E402

__all__ += ["PostLocalSGD", "post_local_hook"]
from .extrap import extrap_allreduce_hook  # noqa: E402

__all__ += ["extrap_allreduce_hook"]
from .swap import SWAP  # noqa: E402

__all__ += ["SWAP"]
