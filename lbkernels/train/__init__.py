"""The training command: ``python -m lbkernels.train`` (or ``lbk-train``).

Runs the large-batch recipes end to end: data sets (scikit-learn's digits, CIFAR-10/100
from their python tarballs, synthetic), models, methods (``--method``), single-process
or ``torchrun`` data-parallel training, metrics, plots and exact checkpoint/resume.
``python -m lbkernels.train --help`` lists every option; see docs/training.md.
"""
