"""mean_sum_squares_ (DDP's averaging pass with every gradient's sum of squares): every
backend against the reference, on the buffer (bitwise) and the sums."""

from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from lbkernels import ops
from lbkernels.reference.average import average_dtype

IMPLS = backend_params() + [pytest.param("reference", "cpu", id="reference")]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1, empty, a chunk + 1, an odd prime, a chunk, a small tensor, and a model of small layers.
SIZES = [1, 0, 65537, 7919, 65536, 33]
SIZES_INTERPRETED = [1, 0, 1025, 127, 1024, 33]
MIXED = [int(n) for n in torch.randint(1, 300, (50,), generator=torch.Generator().manual_seed(5))]

# The compiled backends sum squares in fp32 lanes (fp64 for fp64 buckets) within a chunk
# of 65,536 elements; the oracle sums in fp64. Summing m non-negative terms in a type of
# unit roundoff u is off by at most (m - 1) u relatively; the most terms one fp32 lane
# adds is 65536 / 8 = 8192 (the CPU's eight scalar lanes for fp16/bf16; AVX2 fp32 has
# 32 lanes, CUDA 512 threads, Triton BLOCK lanes). The chunks' sums are added in fp64.
RTOL = {torch.float64: 8192 * 2.0**-53}
RTOL_FP32_LANES = 8192 * 2.0**-24


def sizes_for(impl):
    interpreted = impl == "triton" and not torch.cuda.is_available()
    return (SIZES_INTERPRETED if interpreted else SIZES) + MIXED


def make(sizes, dtype, device, world_size):
    g = torch.Generator().manual_seed(7)
    # A sum of world_size workers' values: world_size times larger than one of them.
    flat = (torch.randn(sum(sizes), generator=g, dtype=torch.float64) * world_size).to(device, dtype)
    out = torch.full((len(sizes),), -1.0, dtype=torch.float64, device=device)
    return flat, out


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_divides_and_sums_each_segment(impl, device, dtype, world_size):
    sizes = sizes_for(impl)
    flat, out = make(sizes, dtype, device, world_size)
    want_flat, want_out = flat.cpu().clone(), out.cpu().clone()
    ops.mean_sum_squares_(want_flat, sizes, world_size, want_out, impl="reference")
    versions = flat._version, out._version
    ops.mean_sum_squares_(flat, sizes, world_size, out, impl=impl)
    # Bitwise: one IEEE division in the arithmetic dtype, one rounding to the bucket's.
    acc = average_dtype(dtype)
    assert torch.equal(want_flat, (make(sizes, dtype, "cpu", world_size)[0].to(acc)
                                   / torch.tensor(world_size, dtype=acc)).to(dtype))
    assert torch.equal(flat.cpu(), want_flat)
    # The oracle's sums: of the stored quotients, in fp64.
    segments = want_flat.double().split(sizes)
    assert torch.equal(want_out, torch.stack([s.square().sum() for s in segments]))
    rtol = RTOL.get(dtype, RTOL_FP32_LANES)
    torch.testing.assert_close(out.cpu(), want_out, rtol=rtol, atol=0.0)
    assert out[sizes.index(0)].item() == 0.0
    # Like an in-place torch op, the op bumps the version of what it writes.
    assert flat._version > versions[0] and out._version > versions[1]


@pytest.mark.parametrize("impl,device", IMPLS)
def test_bad_arguments_change_nothing(impl, device):
    flat, out = make([3, 4], torch.float32, device, 2)
    before = flat.clone(), out.clone()
    cases = [
        ((flat, [3, 4], 0, out), ValueError, "world_size"),
        ((flat.view(7, 1), [3, 4], 2, out), TypeError, "flat must be a contiguous 1-D"),
        ((flat.to(torch.int32), [3, 4], 2, out), TypeError, "flat has dtype"),
        ((flat, [3, -1, 5], 2, torch.zeros(3, dtype=torch.float64, device=device)),
         ValueError, "sizes[1]"),
        ((flat, [3, 3], 2, out), ValueError, "sizes add up to 6"),
        ((flat, [3, 4], 2, out.float()), TypeError, "out must be float64"),
        ((flat, [3, 4], 2, torch.zeros(4, dtype=torch.float64, device=device)[::2]), TypeError,
         "out must be a contiguous 1-D"),
        ((flat, [3, 4], 2, out[:1]), ValueError, "out has 1 elements"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            ops.mean_sum_squares_(*args, impl=impl)
        assert torch.equal(flat, before[0]) and torch.equal(out, before[1])
