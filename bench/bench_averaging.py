"""Weight averaging with the LARS step: ``python -m bench.bench_averaging [--sets ...] [--reps N]``.

Four ways to take a LARS step and keep an SWA running mean of the weights, interleaved
round by round in one process with the step alone (``bench.harness.measure``; the
variants are in ``bench.params``):

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

import os

from .harness import measure, parser, start
from .params import ANCHOR, ANCHOR_PREFIX, variants


def table(rows: list[dict]) -> str:
    anchor = {r["set"]: r["ms"] for r in rows if r["variant"].startswith(ANCHOR_PREFIX)}
    folded = {r["set"]: r["ms"] for r in rows if r["variant"] == "SWA folded into LARS step"}
    lines = ["| set | variant | median ms | x LARS step alone | x folded | GB/s (bytes/param) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["variant"] == ANCHOR:
            continue
        lines.append(f"| {r['set']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['ms'] / anchor[r['set']]:.2f} | {r['ms'] / folded[r['set']]:.2f} | "
                     f"{r['gbs']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0], ["resnet50"]).parse_args(argv)
    start()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    rows = []
    for s in args.sets:
        rows += measure(s, args.device, args.reps, variants(args.device), only=["LARS native", "SWA"])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
