"""Fused optimizers (drop-in ``torch.optim.Optimizer`` subclasses)."""

from .averaging import WeightAverager
from .extrap import ExtrapAdam, ExtrapSGD
from .lars import LARS, lars_param_groups
from .shifted_momentum import ShiftedMomentumSGD

__all__ = ["LARS", "lars_param_groups", "ShiftedMomentumSGD", "WeightAverager"]
__all__ += ["ExtrapSGD", "ExtrapAdam"]
