"""Interleaved benchmark of one optimizer step: ``python -m bench [--sets ...] [--reps N]``.

Every variant (``bench.params.variants``) steps the same parameter set in turn, round
after round, in one process, so that drifts of this shared machine hit all of them
alike (``bench.harness``); the table reports medians, the ratio to
``torch.optim.SGD(fused=True)`` and effective bandwidth counted at 20 bytes per fp32
parameter (read w, g, buf; write w, buf: the minimum of a momentum step), 28 for
ExtrapSGD (which also reads the local gradient and writes the anchor) and for AdamW and
LAMB (read w, g, m, v; write w, m, v). The BERT-base set times only the AdamW and LAMB
rows (``bench.params.SET_VARIANTS``).
"""

from __future__ import annotations

import torch

import lbkernels
from lbkernels import _library

from .harness import measure, parser, start, table
from .params import PARAM_SETS, SET_VARIANTS, variants


def skipped(device: str) -> list[str]:
    notes = []
    if not torch.cuda.is_available():
        notes.append("native-cuda and triton columns skipped: no CUDA device")
    if not _library.has_native_kernel("lars_sgd_", device):
        notes.append(f"native-{device} skipped: {lbkernels.native_unavailable_reason}")
    return notes


def main(argv=None) -> None:
    ap = parser(__doc__.splitlines()[0], list(PARAM_SETS))
    ap.add_argument("--variants", nargs="+", help="run only variants whose name contains one of these")
    args = ap.parse_args(argv)
    start()
    for note in skipped(args.device):
        print("note:", note)
    rows = []
    for s in args.sets:
        rows += measure(s, args.device, args.reps, variants(args.device),
                        only=args.variants or SET_VARIANTS.get(s))
    print(table(rows))


if __name__ == "__main__":
    main()
