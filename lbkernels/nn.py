"""Modules for large-batch training: ghost batch normalisation.

Batch normalisation couples every sample of a batch through the batch statistics, so
growing the batch changes what the network computes (and the gradient noise it sees).
Ghost batch normalisation (Hoffer, Hubara, Soudry 2017) normalises fixed-size slices
of the batch instead, which keeps the normalisation independent of the batch size —
what lets Smith, Kindermans and Le (2018) grow the batch in place of decaying the
learning rate.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GhostBatchNorm:
    """The ghost forward, shared by the 1d and 2d modules (mixed into nn.BatchNormNd)."""

    ghost_batch_size: int

    def _set_ghost_batch_size(self, ghost_batch_size: int) -> None:
        try:
            g = operator.index(ghost_batch_size)
        except TypeError:
            raise ValueError(f"ghost_batch_size must be an integer, got {ghost_batch_size!r}") from None
        if g < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {g}")
        self.ghost_batch_size = g

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        g, n = self.ghost_batch_size, input.shape[0]
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or n <= g:
            return super().forward(input)

        update = self.training and self.track_running_stats
        c, spatial = input.shape[1], input.shape[2:]
        k, rest = divmod(n, g)
        outs, stats = [], []
        # The k whole ghost batches in one call: fold them into the channel dimension,
        # (k*g, C, ...) -> (g, k*C, ...), so that each (ghost batch, channel) pair is a
        # channel of one batch_norm with its own statistics.
        folded = input[: k * g].reshape(k, g, c, *spatial).transpose(0, 1).reshape(g, k * c, *spatial)
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        y = self._normalise(folded, weight, bias, k * c, stats if update else None)
        outs.append(y.reshape(g, k, c, *spatial).transpose(0, 1).reshape(k * g, c, *spatial))
        if rest:
            outs.append(self._normalise(input[k * g :], self.weight, self.bias, c, stats if update else None))
        if update:
            self._update_running_stats(*stats)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _normalise(self, x: Tensor, weight, bias, channels: int, stats: list | None) -> Tensor:
        """Batch norm of ``x`` with its own statistics; when ``stats`` is a list, append
        the per-channel mean and unbiased variance to it."""
        if stats is None:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        # batch_norm with momentum 1 overwrites zero "running" buffers with exactly the
        # batch statistics BatchNorm would fold in, computed in the same pass.
        mean = torch.zeros(channels, dtype=self.running_mean.dtype, device=x.device)
        var = torch.zeros_like(mean)
        y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.eps)
        stats.append((mean.view(-1, self.num_features), var.view(-1, self.num_features)))
        return y

    @torch.no_grad()
    def _update_running_stats(self, *stats: tuple[Tensor, Tensor]) -> None:
        means = torch.cat([m for m, _ in stats])
        variances = torch.cat([v for _, v in stats])
        chunks = means.shape[0]
        # BatchNorm's update once per ghost batch, in order: r <- (1 - f_j) r + f_j s_j,
        # with f_j = momentum, or 1 / (number of batches seen) when momentum is None.
        # Unrolled: r <- prod(1 - f_j) r + sum_j f_j prod_{i > j}(1 - f_i) s_j.
        if self.momentum is None:
            seen = int(self.num_batches_tracked)
            factors = [1.0 / (seen + j + 1) for j in range(chunks)]
        else:
            factors = [float(self.momentum)] * chunks
        weights, keep = [0.0] * chunks, 1.0
        for j in reversed(range(chunks)):
            weights[j] = factors[j] * keep
            keep *= 1.0 - factors[j]
        w = torch.tensor(weights, dtype=means.dtype, device=means.device)
        self.running_mean.mul_(keep).add_(w @ means)
        self.running_var.mul_(keep).add_(w @ variances)
        self.num_batches_tracked.add_(chunks)


_DOC = r"""Ghost batch normalisation over {input}: batch norm of every ghost batch on its own.

    In training, the batch of ``n`` samples is cut along dimension 0 into consecutive
    ghost batches of ``ghost_batch_size`` samples (the last one takes the remaining
    ``n mod ghost_batch_size``), and each is normalised with its own mean and biased
    variance per channel::

        y = (x - mean_j) / sqrt(var_j + eps) * weight + bias        for x in ghost batch j

    with ``weight`` and ``bias`` shared. The running statistics are updated once per
    ghost batch, in order, exactly as ``{base}`` would update them if it were applied
    to ghost batch 0, 1, ... in turn: ``r <- (1 - f) r + f s_j`` with the unbiased
    variance, ``f = momentum`` (or the cumulative average when ``momentum=None``), and
    ``num_batches_tracked`` grows by the number of ghost batches. Their horizon in
    samples is then independent of the batch size, as the normalisation is.

    A batch of at most ``ghost_batch_size`` samples, and evaluation mode, are plain
    ``{base}`` (evaluation normalises with the running statistics; without
    ``track_running_stats`` it uses the ghost-batch statistics, as in training). The
    state dict is ``{base}``'s, so checkpoints load either way; see
    :func:`convert_to_ghost_bn` for existing models.

    Args:
        num_features: ``C``.
        ghost_batch_size: samples per ghost batch (128 in Smith, Kindermans, Le 2018).
        eps, momentum, affine, track_running_stats, device, dtype: as ``{base}``.
    """


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = _DOC.format(input="``(N, C)`` or ``(N, C, L)``", base="nn.BatchNorm1d")

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_ghost_batch_size(ghost_batch_size)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = _DOC.format(input="``(N, C, H, W)``", base="nn.BatchNorm2d")

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_ghost_batch_size(ghost_batch_size)


_GHOST_OF = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


def convert_to_ghost_bn(module: nn.Module, ghost_batch_size: int = 128) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` by its ghost version.

    The replacement takes over the original's parameters and buffers — the same tensor
    objects, so an optimizer built before the conversion keeps working — and its
    train/eval mode; outputs in evaluation mode are unchanged. Ghost modules already
    present get ``ghost_batch_size``; subclasses of BatchNorm other than these are left
    alone (their forward may differ). Children are replaced in place; the converted
    ``module`` is returned (a new object when ``module`` itself is a BatchNorm).
    """
    if isinstance(module, _GhostBatchNorm):
        module._set_ghost_batch_size(ghost_batch_size)
        return module
    cls = _GHOST_OF.get(type(module))
    if cls is not None:
        ghost = cls(
            module.num_features,
            ghost_batch_size,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",  # every tensor is replaced below: allocate nothing
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(ghost, name, getattr(module, name))
        ghost.train(module.training)
        return ghost
    for name, child in module.named_children():
        converted = convert_to_ghost_bn(child, ghost_batch_size)
        if converted is not child:
            setattr(module, name, converted)
    return module
