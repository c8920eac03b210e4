"""Fused optimizers (drop-in ``torch.optim.Optimizer`` subclasses)."""

from .lars import LARS, lars_param_groups
from .shifted_momentum import ShiftedMomentumSGD

__all__ = ["LARS", "lars_param_groups", "ShiftedMomentumSGD"]
