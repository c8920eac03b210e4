"""Weight averaging with the LARS step: ``python -m bench.averaging [--sets ...] [--reps N]``.

Four ways to take a LARS step and keep an SWA running mean of the weights, interleaved
round by round in one process with the step alone (``bench.__main__.measure``):

- ``lbkernels LARS native-<dev>``: the step alone, the anchor of the ratios here;
- ``SWA folded into LARS step``: ``WeightAverager(fused_with=LARS)``, the step's pass
  also reads and writes the fp32 average: 28 bytes per parameter against 20, so 1.4x
  is the memory-bound ceiling, and the target is <= 1.15x (the norms pass and the
  per-call overhead are not repeated);
- ``SWA LARS step + WeightAverager.update``: the step, then one fused ``average_`` call
  (a second sweep re-reading w: 32 bytes per parameter);
- ``SWA LARS step + AveragedModel.update_parameters``: the step, then
  ``torch.optim.swa_utils.AveragedModel`` (what a user would otherwise write; on CPU it
  loops over the tensors, as torch has no foreach SWA kernels there). Target: the folded
  step is >= 1.4x faster than this.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lbkernels.optim import LARS, WeightAverager

from .params import PARAM_SETS

ANCHOR_PREFIX = "lbkernels LARS native-"


class FoldedSWALARS:
    """LARS whose step also updates an SWA mean of the weights (one pass)."""

    BYTES_PER_PARAM = 28

    def __init__(self, params, **hp):
        self.opt = LARS(params, impl="native", **hp)
        self.averager = WeightAverager(params, mode="swa", fused_with=self.opt)

    def step(self):
        self.opt.step()


class LARSThenWeightAverager:
    """The LARS step, then ``WeightAverager.update()`` (a second sweep over w)."""

    BYTES_PER_PARAM = 32

    def __init__(self, params, **hp):
        self.opt = LARS(params, impl="native", **hp)
        self.averager = WeightAverager(params, mode="swa", impl="native")

    def step(self):
        self.opt.step()
        self.averager.update()


class LARSThenAveragedModel:
    """The LARS step, then ``AveragedModel.update_parameters`` (torch's SWA)."""

    BYTES_PER_PARAM = 32

    def __init__(self, params, **hp):
        self.opt = LARS(params, impl="native", **hp)
        self.module = nn.ParameterList(params)
        self.swa = AveragedModel(self.module)

    def step(self):
        self.opt.step()
        self.swa.update_parameters(self.module)


def averaging_variants(device: str, hp: dict) -> dict:
    """The three averaging variants (native LARS kernels; empty where not built)."""
    from lbkernels import _library

    if not _library.has_native_kernel("lars_sgd_", device):
        return {}
    return {
        "SWA folded into LARS step": lambda ps: FoldedSWALARS(ps, **hp),
        "SWA LARS step + WeightAverager.update": lambda ps: LARSThenWeightAverager(ps, **hp),
        "SWA LARS step + AveragedModel.update_parameters": lambda ps: LARSThenAveragedModel(ps, **hp),
    }


def table(rows: list[dict]) -> str:
    anchor = {r["set"]: r["ms"] for r in rows if r["variant"].startswith(ANCHOR_PREFIX)}
    folded = {r["set"]: r["ms"] for r in rows if r["variant"] == "SWA folded into LARS step"}
    lines = ["| set | variant | median ms | x LARS step alone | x folded | GB/s (bytes/param) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["variant"] == "SGD fused":
            continue
        lines.append(f"| {r['set']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['ms'] / anchor[r['set']]:.2f} | {r['ms'] / folded[r['set']]:.2f} | "
                     f"{r['gbs']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from .__main__ import header, measure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["resnet50"], choices=list(PARAM_SETS))
    ap.add_argument("--reps", type=int, default=21, help="measured rounds per variant (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(header())
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    rows = []
    for s in args.sets:
        rows += measure(s, args.device, args.reps, only=["LARS native", "SWA"])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
