"""The fused optimizers on sharded parameters (FSDP2 ``fully_shard``, DTensor) against the
same run under DDP, on 2 and 3 gloo processes.

FSDP2 gives each rank a shard of every parameter, so a LARS trust ratio computed from the
local shard would differ from the DDP run; the optimizers reduce the shards' sums of
squares in one collective per (process group, dtype) and step the local shards
(docs/algorithms.md section 1). One job per world size runs every case, so the processes
start once.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lbkernels.distributed import average_parameters
from lbkernels.optim import LAMB, LARS, ExtrapAdam, ExtrapSGD, ShiftedMomentumSGD, WeightAverager

STEPS = 5
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# (model, dtype, optimizer, mesh): mesh "1d" is FSDP over all ranks, "hsdp" a 2-D mesh
# (replicate 1, shard world): HSDP's placements (Replicate(), Shard(0)).
CASES = [
    ("mlp", torch.float64, "lars", "1d"),
    ("cnn", torch.float64, "lars", "1d"),
    ("mlp", torch.float32, "lars", "1d"),
    ("cnn", torch.float32, "lars+swa", "1d"),
    ("mlp", torch.float64, "shifted", "1d"),
    ("mlp", torch.float64, "averager", "1d"),
    ("mlp", torch.float64, "lars", "hsdp"),
    # The last layer left unsharded (plain tensors, averaged by hand): one op call mixes
    # norms given by the collective with norms the op computes itself.
    ("mlp", torch.float64, "lars", "mixed"),
    # LAMB's ratio needs ||u||: its moments and its write are two calls around the norms'
    # all-reduce; with global clipping the gradients' norm takes another all-reduce.
    ("mlp", torch.float64, "lamb", "1d"),
    ("cnn", torch.float32, "lamb+clip", "1d"),
    ("mlp", torch.float64, "lamb", "mixed"),
]


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 3))
    else:
        m = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return m.to(dtype)


def _batch(kind: str, dtype: torch.dtype, step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = (8, 6) if kind == "mlp" else (8, 2, 6, 6)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def _optimizer(name: str, model: nn.Module):
    """(optimizer, averager or None, whether the averager is updated after the step)."""
    params = list(model.parameters())
    # Large trust coefficient: the ratios move the weights visibly, so that a ratio from a
    # shard's norms instead of the whole tensor's fails the comparison by far.
    if name.startswith("lamb"):
        clip = dict(max_grad_norm=0.05) if name == "lamb+clip" else {}
        return LAMB(params, lr=0.05, weight_decay=1e-2, max_trust=10.0, **clip), None, False
    if name == "shifted":
        return ShiftedMomentumSGD(params, lr=0.2, momentum=0.9, delay=1, weight_decay=1e-3,
                                  lars=True, trust_coefficient=0.05), None, False
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05, nesterov=True)
    if name == "lars+swa":
        return opt, WeightAverager(params, mode="swa", fused_with=opt), False
    if name == "averager":
        return opt, WeightAverager(params, mode="ema", decay=0.5), True
    return opt, None, False


def _state_tensors(opt, averager) -> list[torch.Tensor]:
    out = []
    for p in (p for g in opt.param_groups for p in g["params"]):
        out += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if averager is not None:
        out += averager.averages
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run_case(rank, world, meshes, kind, dtype, name, mesh, patch_norms=False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    from lbkernels import _sharded

    ddp_model = nn.parallel.DistributedDataParallel(_model(kind, dtype))
    fsdp_model = _model(kind, dtype)
    plain = list(fsdp_model[-1].parameters()) if mesh == "mixed" else []
    layers = [m for m in fsdp_model if any(True for _ in m.parameters())]
    for layer in layers[:-1] if plain else layers:
        fully_shard(layer, mesh=meshes["1d" if plain else mesh])
    if not plain:
        fully_shard(fsdp_model, mesh=meshes[mesh])
    ddp_opt, ddp_avg, ddp_update = _optimizer(name, ddp_model.module)
    fsdp_opt, fsdp_avg, _ = _optimizer(name, fsdp_model)
    counts = []
    real_dist = _sharded.dist
    if patch_norms:  # the shards' own norms: what the optimizers must not use
        _sharded.dist = types.SimpleNamespace(all_reduce=lambda *a, **k: None)
    try:
        for t in range(STEPS):
            x, y = _batch(kind, dtype, t, rank)
            for model, opt, avg in ((ddp_model, ddp_opt, ddp_avg), (fsdp_model, fsdp_opt, fsdp_avg)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                for p in plain if model is fsdp_model else []:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                if model is fsdp_model:
                    with CommDebugMode() as comm:
                        opt.step()
                    counts.append(comm.get_total_counts())
                else:
                    opt.step()
                if ddp_update:
                    avg.update()
    finally:
        _sharded.dist = real_dist
    errors = [_rel(_full(a.detach()), b.detach())
              for a, b in zip(fsdp_model.parameters(), ddp_model.module.parameters())]
    state_errors = [_rel(_full(a), b) for a, b in zip(_state_tensors(fsdp_opt, fsdp_avg),
                                                     _state_tensors(ddp_opt, ddp_avg))]
    n_state = len(_state_tensors(ddp_opt, ddp_avg))
    placements = {str(getattr(p, "placements", "plain")) for p in fsdp_model.parameters()}
    return dict(weights=max(errors), state=max(state_errors, default=0.0), n_state=n_state,
                n_state_fsdp=len(state_errors), counts=counts, placements=placements)


def _job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"1d": init_device_mesh("cpu", (world,)),
              "hsdp": init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))}
    out = {case: _run_case(rank, world, meshes, *case) for case in CASES}
    for name in ("lars", "lamb"):
        out[f"local norms {name}"] = _run_case(rank, world, meshes, "mlp", torch.float64, name,
                                               "1d", patch_norms=True)
    out["refusals"] = _refusals(meshes["1d"])
    return out


def _refusals(mesh) -> dict[str, str]:
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model("mlp", torch.float32), mesh=mesh)
    out = {}
    for cls in (ExtrapSGD, ExtrapAdam):
        try:
            cls(model.parameters(), lr=0.1)
        except ValueError as e:
            out[cls.__name__] = str(e)
    try:  # SWAP's phase 3 (average_parameters)
        average_parameters(model.parameters())
    except ValueError as e:
        out["average_parameters"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(gloo):
    return {world: gloo(world).run(_job) for world in (2, 3)}


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_sharded_step_matches_ddp(runs, world, case):
    kind, dtype, name, mesh = case
    for rank, res in enumerate(runs[world]):
        assert res[case]["weights"] < TOL[dtype], (rank, res[case])
        # Every state tensor (momentum buffers, averages) compared, and there are some.
        assert res[case]["n_state_fsdp"] == res[case]["n_state"] > 0
        assert res[case]["state"] < TOL[dtype], (rank, res[case])
        expected = {"1d": {"(Shard(dim=0),)"}, "hsdp": {"(Replicate(), Shard(dim=0))"},
                    "mixed": {"(Shard(dim=0),)", "plain"}}[mesh]
        assert res[case]["placements"] == expected


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_one_norm_collective_per_step(runs, world, case):
    # All of a step's layer norms in one all-reduce (one mesh, one dtype): not one per tensor.
    # The "mixed" cases have one unsharded layer, whose gradients are averaged by hand
    # outside the counted step.
    expected = 2 if case[2] == "lamb+clip" else 1  # clipping: the gradients' norm too
    for res in runs[world]:
        assert res[case]["counts"] == [expected] * STEPS


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_shard_local_norms_would_be_caught(runs, world):
    # The same LARS and LAMB runs with the collective removed (each rank's trust ratio from
    # its own shard) depart from DDP by far more than the tolerance: the comparison sees it.
    for res in runs[world]:
        for name in ("lars", "lamb"):
            assert res[f"local norms {name}"]["weights"] > 1e-4, res[f"local norms {name}"]


@pytest.mark.distributed
def test_extrapolation_refuses_sharded_params(runs):
    for res in runs[2]:
        for name in ("ExtrapSGD", "ExtrapAdam"):
            message = res["refusals"][name]
            assert "DTensor" in message and "own extrapolated point" in message
            assert "DistributedDataParallel" in message and "\n" not in message
        message = res["refusals"]["average_parameters"]
        assert "DTensor" in message and "no per-worker copies" in message and "\n" not in message


def _checkpoint_job(rank, world, directory):
    """LARS (with fused SWA) on a sharded MLP, saved after 2 steps with
    torch.distributed.checkpoint and loaded into a fresh model and optimizer: the next
    steps of both are bitwise equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        model = _model("mlp", torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(seed)
        for layer in model[::2]:
            fully_shard(layer)
        fully_shard(model)
        opt = LARS(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05)
        return model, opt

    def step(model, opt, t):
        x, y = _batch("mlp", torch.float32, t, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model, opt = build(0)
    for t in range(2):
        step(model, opt, t)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)
    fresh, fresh_opt = build(1)
    msd2, osd2 = get_state_dict(fresh, fresh_opt)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for t in range(2, 4):
        step(model, opt, t)
        step(fresh, fresh_opt, t)
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(model.parameters(), fresh.parameters()))
    buffers = [(opt.state[a]["momentum_buffer"], fresh_opt.state[b]["momentum_buffer"])
               for a, b in zip(model.parameters(), fresh.parameters())]
    same_state = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in buffers)
    kinds = {type(a).__name__ for a, _ in buffers}
    return same, same_state, kinds


@pytest.mark.distributed
def test_sharded_state_round_trips_through_distributed_checkpoint(gloo, tmp_path):
    for same, same_state, kinds in gloo(2).run(_checkpoint_job, str(tmp_path / "ckpt")):
        assert kinds == {"DTensor"}  # the momentum buffers are sharded like their params
        assert same and same_state


def _replicated_job(rank, world):
    """LARS and LAMB over a Shard(0) DTensor, a Replicate() DTensor and a plain tensor,
    with the gradients of one full-tensor run split the same way, against that run: the
    replicated and plain params need no collective, the sharded one its one all-reduce.
    LAMB clamps ||w|| (max_trust below the weights' norms, ~5.9): its ratio is not
    invariant under scaling both norms, as LARS's is up to eps, so a replicated param's
    norms summed over the ranks (sqrt(world) too large) would show."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [[torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(3)]
    out = {}
    for name, make in (("LARS", lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3,
                                                 trust_coefficient=0.05)),
                       ("LAMB", lambda ps: LAMB(ps, lr=0.1, max_trust=3.0))):
        ref = [t.clone() for t in full]
        ref_opt = make(ref)
        mine = [nn.Parameter(distribute_tensor(full[0].clone(), mesh, [Shard(0)])),
                nn.Parameter(distribute_tensor(full[1].clone(), mesh, [Replicate()])),
                full[2].clone()]
        opt = make(mine)
        counts = []
        for step_grads in grads:
            for p, gr in zip(ref, step_grads):
                p.grad = gr.clone()
            ref_opt.step()
            mine[0].grad = distribute_tensor(step_grads[0].clone(), mesh, [Shard(0)])
            mine[1].grad = distribute_tensor(step_grads[1].clone(), mesh, [Replicate()])
            mine[2].grad = step_grads[2].clone()
            with CommDebugMode() as comm:
                opt.step()
            counts.append(comm.get_total_counts())
        out[name] = max(_rel(_full(a.detach()), b) for a, b in zip(mine, ref)), counts
    return out


@pytest.mark.distributed
def test_replicated_and_plain_params_need_no_collective(gloo):
    for res in gloo(2).run(_replicated_job):
        for name, (error, counts) in res.items():
            assert error < TOL[torch.float64], name
            assert counts == [1, 1, 1], name  # the Shard(0) param's norms only
