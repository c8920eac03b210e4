"""DDP's averaging pass with and without the gradient norms:
``python -m bench.grad_norms [--sets resnet50] [--reps N]``.

The grads are views of flat 25 MiB buckets, as DDP's ``gradient_as_bucket_view=True``
makes them (params bucketed in reverse order, as DDP first fills them). Each variant
is the work after the all-reduce, with 2 as the world size and no communication (the
all-reduce is the same in both), interleaved round by round in one process
(``bench.harness.measure``):

- ``(a) bucket.div_ + SGD fused``: DDP's default hook divides every bucket
  (``div_(world_size)``), then ``torch.optim.SGD(fused=True)`` steps;
- ``(b) mean_sum_squares_ + LARS``: the grad-norm hook's op divides every bucket and
  sums each gradient's squares in the same pass (``lbkernels.distributed.grad_norms``,
  its real layout and freshness code, fed these buckets), then ``LARS`` steps with the
  gradient norms given: its norm pass reads ``w`` only.

Target: (b) <= 1.05x (a). Both read and write every gradient once in the averaging and
read w, g, buf and write w, buf in the step: (b)'s ``||w||`` comes from the norm cache
(``reuse_norms=True``, the default: the previous step's update summed the new weights),
so from its second step the LARS step reads what SGD's does.
"""

from __future__ import annotations

import torch

from lbkernels.distributed.grad_norms import GradNorms
from lbkernels.optim import LARS

from .harness import measure, parser, start, table
from .params import ANCHOR, HP

BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb
WORLD_SIZE = 2


class _Bucket:
    """What GradNorms reads of a ``torch.distributed.GradBucket``."""

    def __init__(self, index: int, params: list, buffer: torch.Tensor):
        self._index, self._params, self._buffer = index, params, buffer

    def index(self) -> int:
        return self._index

    def parameters(self) -> list:
        return self._params

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for p in self._params]


def bucketed(params: list) -> list[_Bucket]:
    """Moves the grads of ``params`` into flat buckets of at most BUCKET_BYTES (reverse
    order), each grad then a view of its bucket."""
    buckets, current, size = [], [], 0
    for p in reversed(params):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= BUCKET_BYTES:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    out = []
    for b, ps in enumerate(buckets):
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        for p, view in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad = view.view_as(p)
        out.append(_Bucket(b, ps, flat))
    return out


def groups(params: list) -> list[dict]:
    """lars_param_groups' split: weights decayed (and adapted), the rest not."""
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": HP["weight_decay"]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]


class DefaultAveraging:
    """(a): bucket.div_(world_size), then torch.optim.SGD(fused=True)."""

    def __init__(self, params: list):
        self.buckets = bucketed(params)
        self.opt = torch.optim.SGD(groups(params), lr=HP["lr"], momentum=HP["momentum"], fused=True)

    def step(self) -> None:
        for b in self.buckets:
            b.buffer().div_(WORLD_SIZE)
        self.opt.step()


class HookAveraging:
    """(b): mean_sum_squares_ per bucket (through GradNorms), then LARS with those norms."""

    def __init__(self, params: list):
        self.buckets = bucketed(params)
        self.opt = LARS(groups(params), lr=HP["lr"], momentum=HP["momentum"], impl="native")
        self.norms = GradNorms(len(params), params[0].device)
        self.opt.take_grad_norms(self.norms)  # as grad_norms.attach does

    def step(self) -> None:
        for b in self.buckets:
            layout = self.norms.layout(b)
            self.norms.reduced(b.index(), layout, b.buffer(), WORLD_SIZE)
        self.opt.step()


def main() -> None:
    ap = parser(__doc__.splitlines()[0], ["resnet50"])
    args = ap.parse_args()
    start()
    variants = {
        ANCHOR: lambda ps: torch.optim.SGD(ps, fused=True, **HP),
        "(a) bucket.div_ + SGD fused": DefaultAveraging,
        "(b) mean_sum_squares_ + LARS": HookAveraging,
    }
    for name in args.sets:
        rows = measure(name, args.device, args.reps, variants)
        print(table(rows))
        ms = {r["variant"]: r["ms"] for r in rows}
        print(f"\n{name}: (b) / (a) = {ms['(b) mean_sum_squares_ + LARS'] / ms['(a) bucket.div_ + SGD fused']:.3f}"
              " (target <= 1.05)")


if __name__ == "__main__":
    main()
