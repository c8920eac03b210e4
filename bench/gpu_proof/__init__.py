"""The GPU proof: ``python -m bench.gpu_proof --out DIR`` (``make gpu-proof OUT=DIR``) on a
GPU machine with nothing prepared (no network, no pip) proves lbkernels' GPU path in
under 10 minutes; ``--dry-run`` (``make gpu-proof-dry-run``) rehearses every stage a
CPU can, in about 20 seconds.

Stages (``__main__.STAGES``), each a subprocess with its own time limit (a stage that
overruns is interrupted, keeps what it wrote, and the next one runs):

(a) build: the extension in place for the one GPU present (``TORCH_CUDA_ARCH_LIST`` from
    its compute capability, ``MAX_JOBS`` = cores; setup.py passes ``--threads`` to nvcc);
(b) tests: the CUDA part of the suite (``-k cuda``: the ``native-cuda`` / ``triton-cuda``
    backends and the CUDA-only tests), log and JUnit XML;
(c) bench: the GPU benchmark table (``bench.gpu_table``);
(d) train: the training command once per method, images/s and the optimizer's share
    of the step (``bench.gpu_proof.train``);
(e) the ``auto_pick`` table from (c), the summary (``summary.md``, ``summary.json``)
    with versions and device.

The ``auto_pick.json`` written under DIR is what ``impl="auto"`` would use on that GPU;
shipping it is a manual copy to ``lbkernels/triton/auto_pick.json``.
"""
