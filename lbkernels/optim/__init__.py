"""Fused optimizers (drop-in ``torch.optim.Optimizer`` subclasses)."""

from .extrap import ExtrapSGD
from .extrap_adam import ExtrapAdam
from .lamb import LAMB, lamb_param_groups
from .lars import LARS, lars_param_groups
from .shifted_momentum import ShiftedMomentumSGD
from .weight_averager import WeightAverager

__all__ = ["LARS", "lars_param_groups", "LAMB", "lamb_param_groups", "ShiftedMomentumSGD",
           "WeightAverager", "ExtrapSGD", "ExtrapAdam"]
