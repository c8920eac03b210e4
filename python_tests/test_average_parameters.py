"""lbkernels.distributed.average_parameters: the cross-worker mean of parameters."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lbkernels.distributed import average_parameters

WORLD = 3


def model(seed: int) -> nn.Module:
    """Conv + BN + linear, an fp64 and a transposed (non-contiguous) parameter."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 5))
    m.register_parameter("extra64", nn.Parameter(torch.randn(7, 3, dtype=torch.float64)))
    m.register_parameter("transposed", nn.Parameter(torch.randn(6, 5).t()))
    m[1].weight.data.uniform_(0.5, 1.5)
    m[1].running_mean.fill_(float(seed))  # buffers differ per rank and must stay so
    m[1].running_var.fill_(float(seed + 1))
    return m


def perturb(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def digest(m: nn.Module) -> str:
    h = hashlib.sha256()
    for p in m.parameters():
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ranks(rank: int, world: int) -> dict:
    m = model(rank)
    buffers = [b.clone() for b in m.buffers()]
    results = {}
    # Round 1 over the default group; round 2 after different per-rank steps, reusing
    # the cached flat buffers; round 3 over a subgroup that excludes rank 2.
    average_parameters(m)
    results["round1"] = [p.detach().clone() for p in m.parameters()]
    digests = [None] * WORLD
    dist.all_gather_object(digests, digest(m))
    results["digests1"] = digests
    perturb(m, rank)
    average_parameters(m.parameters())
    results["round2"] = [p.detach().clone() for p in m.parameters()]
    dist.all_gather_object(digests, digest(m))
    results["digests2"] = digests
    sub = dist.new_group([0, 1])
    perturb(m, 10 + rank)
    results["before3"] = [p.detach().clone() for p in m.parameters()]
    average_parameters(m, group=sub)
    results["round3"] = [p.detach().clone() for p in m.parameters()]
    results["buffers_unchanged"] = all(torch.equal(a, b) for a, b in zip(buffers, m.buffers()))
    results["transposed_stride"] = m.transposed.stride()
    return results


def assert_mean(got: list[torch.Tensor], per_rank: list[list[torch.Tensor]]) -> None:
    for i, g in enumerate(got):
        ws = [r[i].double() for r in per_rank]
        exact = sum(ws) / len(ws)
        # Two roundings of the sum (gloo's order is its own), one of the quotient: each
        # at most eps/2 of a value bounded by sum |w_k|, so 2*eps*sum|w_k|/K bounds them.
        eps = torch.finfo(g.dtype).eps
        bound = 2 * eps * sum(w.abs() for w in ws) / len(ws)
        assert torch.all((g.double() - exact).abs() <= bound), f"param {i}"


@pytest.mark.distributed
def test_three_ranks_hold_the_bitwise_same_mean(gloo):
    res = gloo(WORLD).run(_ranks)
    initial = [[p.detach() for p in model(r).parameters()] for r in range(WORLD)]

    assert len(set(res[0]["digests1"])) == 1 and res[0]["digests1"] == res[1]["digests1"]
    assert_mean(res[0]["round1"], initial)

    perturbed = []
    for r in range(WORLD):
        m = model(0)
        with torch.no_grad():
            for p, q in zip(m.parameters(), res[r]["round1"]):
                p.copy_(q)
        perturb(m, r)
        perturbed.append([p.detach() for p in m.parameters()])
    assert len(set(res[0]["digests2"])) == 1
    assert_mean(res[0]["round2"], perturbed)

    # Subgroup {0, 1}: those two hold their mean (bitwise equal); rank 2 is untouched.
    for a, b in zip(res[0]["round3"], res[1]["round3"]):
        assert torch.equal(a, b)
    assert_mean(res[0]["round3"], [res[0]["before3"], res[1]["before3"]])
    for a, b in zip(res[2]["round3"], res[2]["before3"]):
        assert torch.equal(a, b)
    assert not torch.equal(res[0]["round3"][0], res[2]["round3"][0])

    for r in range(WORLD):
        assert res[r]["buffers_unchanged"]
        assert res[r]["transposed_stride"] == (1, 5)  # written in place, layout kept


def test_without_a_process_group_nothing_changes():
    m = model(0)
    before = [p.detach().clone() for p in m.parameters()]
    assert not dist.is_initialized()
    average_parameters(m)
    for a, b in zip(m.parameters(), before):
        assert torch.equal(a, b)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="single tensor"):
        average_parameters(torch.zeros(3))
    with pytest.raises(TypeError, match=r"params\[1\]"):
        average_parameters([torch.zeros(3), torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"params\[0\] is a list"):
        average_parameters([[1.0]])
    with pytest.raises(ValueError, match="impl"):
        average_parameters([torch.zeros(3)], impl="fast")
