"""Helpers for data-parallel jobs (``torchrun``, gloo on CPU, NCCL on GPU)."""

from .accumulation import StepStats, accumulate_gradients

__all__ = ["StepStats", "accumulate_gradients"]
