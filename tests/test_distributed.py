"""gather_distributed cross-correlation on real 2- and 3-process gloo groups (CPU).

One spawn per world size runs every case; each rank saves its loss and gradients and the
parent compares them with single-process oracles:
- batch_stats="global": the single-process loss of the concatenated batch (values; gradients
  of each rank's rows = world_size x the single-process gradients of those rows), uneven shards;
- batch_stats="local": lightly's BarlowTwinsLoss(gather_distributed=True), transcribed below as a
  plain-PyTorch oracle that runs in the same processes with its own dist.all_reduce;
- DistributedDataParallel: parameter gradients equal the single-process model's on the whole batch;
- NaN on one rank gives NaN on every rank; a column constant over the whole batch raises on every
  rank (no rank is left waiting), while one constant only on one shard is fine.
"""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fcl_ext
from fcl_ext import distributed, ops, reference
from fcl_ext.losses import CrossCorrelationLoss
from tests.testing import assert_close, make_logits

SPAWN_DEADLINE_S = 240  # import + init of up to 3 processes on a busy 2-core machine

FCCL = dict(off_diag_weight=0.0051, off_diag_target=-1.0, unbiased=True, eps=0.0)
BARLOW = dict(off_diag_weight=0.005, off_diag_target=0.0, unbiased=False, eps=1e-5)
SHARDS = {2: [5, 8], 3: [3, 6, 4]}  # uneven on purpose (global statistics)
EQUAL_SHARD = 6
K = 5


# ---- lightly's definition, transcribed (lightly 1.6: per-view normalisation, lightly-ai/lightly#1806) ----

def lightly_barlow_twins_loss(z_a, z_b, lambda_param=5e-3, gather_distributed=True, group=None):
    """lightly.loss.BarlowTwinsLoss.forward: each view batch-normalised on its own (F.batch_norm,
    training mode: biased variance, eps 1e-5), c = z_a_norm^T z_b_norm / N on the local batch, then
    with gather_distributed c / world_size all-reduced with the untracked dist.all_reduce."""
    z_a_norm = F.batch_norm(z_a, None, None, training=True)
    z_b_norm = F.batch_norm(z_b, None, None, training=True)
    c = z_a_norm.T @ z_b_norm / z_a.shape[0]
    if gather_distributed and dist.is_initialized() and dist.get_world_size(group) > 1:
        c = c / dist.get_world_size(group)
        dist.all_reduce(c, group=group)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambda_param * off_diag


# ---- the inputs (made in the parent, sliced per rank in the workers) ---------------------------

def make_views(rows, seed):
    a = make_logits((rows, K), seed=seed, scale=2.0)
    b = a + make_logits((rows, K), seed=seed + 1, scale=1.0)
    return a, b


def shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def make_cases(world):
    sizes = SHARDS[world]
    total = sum(sizes)
    equal = [EQUAL_SHARD] * world
    a, b = make_views(total, seed=world)
    la, lb = make_views(EQUAL_SHARD * world, seed=10 + world)
    nan_a = a.clone()
    nan_a[sizes[0], 1] = float("nan")  # a row of rank 1
    const_a = a.clone()
    const_a[:, 2] = 3.0  # constant over the whole batch
    local_const_a = a.clone()
    local_const_a[:sizes[0], 2] = 3.0  # constant on rank 0's shard only
    return {
        "global_fccl": dict(a=a, b=b, sizes=sizes, kwargs=FCCL, grads=(True, False)),
        "global_barlow": dict(a=a, b=b, sizes=sizes, kwargs=BARLOW, grads=(True, True), module=True),
        "global_barlow_f32": dict(a=a.float(), b=b.float(), sizes=sizes, kwargs=BARLOW, grads=(True, True)),
        "global_fccl_bf16": dict(a=a.bfloat16(), b=b.bfloat16(), sizes=sizes, kwargs=FCCL, grads=(True, True)),
        "global_matrix": dict(a=a, b=b[:, :3], sizes=sizes, kwargs=dict(unbiased=True, eps=0.0), grads=(True, True),
                              matrix=True),
        "local_barlow": dict(a=la, b=lb, sizes=equal, kwargs=dict(BARLOW, batch_stats="local"), grads=(True, True),
                             lightly=True),
        "local_barlow_module": dict(a=la, b=lb, sizes=equal, kwargs=dict(BARLOW, batch_stats="local"),
                                    grads=(True, True), module=True),
        "global_nan": dict(a=nan_a, b=b, sizes=sizes, kwargs=BARLOW, grads=(True, True)),
        "global_constant": dict(a=const_a, b=b, sizes=sizes, kwargs=FCCL, grads=(True, False)),
        "global_locally_constant": dict(a=local_const_a, b=b, sizes=sizes, kwargs=FCCL, grads=(True, False)),
    }


def _run_case(case, rank, group):
    a = shard(case["a"], case["sizes"], rank).clone().requires_grad_(case["grads"][0])
    b = shard(case["b"], case["sizes"], rank).clone().requires_grad_(case["grads"][1])
    kw = dict(case["kwargs"], group=group)
    try:
        if case.get("matrix"):
            out = ops.cross_correlation_matrix(a, b, gather_distributed=True, **kw)
        elif case.get("module"):
            out = CrossCorrelationLoss(gather_distributed=True, **kw)(a, b)
        else:
            out = ops.cross_correlation_loss(a, b, gather_distributed=True, **kw)
    except ValueError as err:
        return {"error": str(err)}
    g_out = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)  # same on every rank
    inputs = [t for t in (a, b) if t.requires_grad]
    grads = torch.autograd.grad(out, inputs, g_out)
    result = {"out": out.detach(), "grads": [g.detach() for g in grads], "grad_out": g_out}
    if case.get("lightly"):
        la = a.detach().clone().requires_grad_(True)
        lb = b.detach().clone().requires_grad_(True)
        ref = lightly_barlow_twins_loss(la, lb, lambda_param=kw["off_diag_weight"], group=group)
        result["lightly_out"] = ref.detach()
        result["lightly_grads"] = [g.detach() for g in torch.autograd.grad(ref, (la, lb))]
    return result


def _ddp_case(rank, world, group):
    """A linear projector under DDP; the loss of its two views' outputs; the parameter grads."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Linear(4, K, dtype=torch.float64)
    ddp = DDP(model, process_group=group)
    x1, x2 = make_ddp_inputs(world)
    sizes = SHARDS[world]
    loss = CrossCorrelationLoss.barlow_twins(lambd=5e-3, gather_distributed=True, group=group)(
        ddp(shard(x1, sizes, rank)), ddp(shard(x2, sizes, rank)))
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": model.weight.grad.clone(), "bias_grad": model.bias.grad.clone()}


def make_ddp_inputs(world):
    rows = sum(SHARDS[world])
    x1 = make_logits((rows, 4), seed=50 + world, scale=1.0)
    return x1, x1 + 0.3 * make_logits((rows, 4), seed=60 + world, scale=1.0)


def _worker(rank, port, out_dir, cases):
    """Rank `rank` of a 3-process world: the cases on the world group, then (ranks 0 and 1) on a
    2-process subgroup, which also exercises the group= argument."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=timedelta(seconds=120))
    try:
        pair = dist.new_group([0, 1])  # collective: every rank calls it
        results = {}
        for world, group in ((3, None), (2, pair)):
            if rank >= world:
                continue
            res = {name: _run_case(case, rank, group) for name, case in cases[world].items()}
            res["ddp"] = _ddp_case(rank, world, group)
            results[world] = res
        results["imported_from"] = distributed.__file__  # the parent's copy of fcl_ext, not another install
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed gloo backend")
    """One spawn of 3 processes (process start-up dominates the cost): {world: (cases, [per-rank results])}."""
    out_dir = tmp_path_factory.mktemp("gloo")
    cases = {world: make_cases(world) for world in (2, 3)}
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir), cases), nprocs=3, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=5):  # waits on the processes' sentinels; raises if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the 3-process gloo group did not finish within {SPAWN_DEADLINE_S} s")
    per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(3)]
    assert all(res["imported_from"] == distributed.__file__ for res in per_rank)
    return {world: (cases[world], [per_rank[r][world] for r in range(world)]) for world in (2, 3)}


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def group_run(request, gloo_runs):
    world = request.param
    cases, results = gloo_runs[world]
    return world, cases, results


# ---- the checks ------------------------------------------------------------------------------

def single_process(case):
    """Loss (or matrix) of the concatenated batch and its gradients, with the same grad_output."""
    a = case["a"].clone().requires_grad_(case["grads"][0])
    b = case["b"].clone().requires_grad_(case["grads"][1])
    kw = {k: v for k, v in case["kwargs"].items() if k != "batch_stats"}
    out = ops.cross_correlation_matrix(a, b, **kw) if case.get("matrix") else ops.cross_correlation_loss(a, b, **kw)
    ref = (reference.cross_correlation_matrix(a, b, **kw) if case.get("matrix")
           else reference.cross_correlation_loss(a, b, **kw))
    g_out = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
    inputs = [t for t in (a, b) if t.requires_grad]
    return out.detach(), ref.detach(), torch.autograd.grad(out, inputs, g_out)


@pytest.mark.parametrize("name", ["global_fccl", "global_barlow", "global_barlow_f32", "global_fccl_bf16",
                                  "global_matrix",
                                  "global_locally_constant"])
def test_global_stats_equal_the_concatenated_batch(group_run, name):
    world, cases, results = group_run
    case = cases[name]
    out, ref, grads = single_process(case)
    dtype = case["a"].dtype
    assert_close(out, ref, dtype)
    for rank, res in enumerate(results):
        assert "error" not in res[name], res[name].get("error")
        assert_close(res[name]["out"], out, dtype)
        assert len(res[name]["grads"]) == len(grads)
        for g_rank, g_full in zip(res[name]["grads"], grads):
            # each rank gets world_size x its rows' gradient (DDP's averaging divides it back)
            assert_close(g_rank, world * shard(g_full, case["sizes"], rank), dtype)


def test_global_stats_do_not_equal_the_local_shards(group_run):
    """The check above can fail: a rank's own loss differs from the gathered one."""
    world, cases, results = group_run
    case = cases["global_barlow"]
    own = ops.cross_correlation_loss(shard(case["a"], case["sizes"], 0), shard(case["b"], case["sizes"], 0),
                                     **case["kwargs"])
    assert abs(own.item() - results[0]["global_barlow"]["out"].item()) > 1e-3


@pytest.mark.parametrize("name", ["local_barlow", "local_barlow_module"])
def test_local_stats_equal_lightly(group_run, name):
    world, cases, results = group_run
    case = cases[name]
    kw = {k: v for k, v in case["kwargs"].items() if k != "batch_stats"}
    # the same definition in one process: the mean of the shards' single-process matrices
    shards = [(shard(case["a"], case["sizes"], r), shard(case["b"], case["sizes"], r)) for r in range(world)]
    mean_matrix = sum(reference.cross_correlation_matrix(a, b, unbiased=kw["unbiased"], eps=kw["eps"])
                      for a, b in shards) / world
    expected = distributed.loss_from_matrix(mean_matrix, kw["off_diag_weight"], kw["off_diag_target"])
    for res in results:
        assert_close(res[name]["out"], expected)
    lightly = [res["local_barlow"] for res in results]
    for res, lres in zip(results, lightly):
        assert_close(lres["lightly_out"], expected)
        assert_close(res[name]["out"], lres["lightly_out"])
        # lightly's untracked all_reduce passes gradients through unchanged: ours are world_size x
        assert len(res[name]["grads"]) == len(lres["lightly_grads"]) == 2
        for g, g_lightly in zip(res[name]["grads"], lres["lightly_grads"]):
            assert_close(g, world * res[name]["grad_out"] * g_lightly)


def test_local_stats_differ_from_global_stats_on_uneven_data(group_run):
    world, cases, results = group_run
    case = cases["local_barlow"]
    kw = {k: v for k, v in case["kwargs"].items() if k != "batch_stats"}
    whole = ops.cross_correlation_loss(case["a"], case["b"], **kw)
    assert abs(whole.item() - results[0]["local_barlow"]["out"].item()) > 1e-6


def test_ddp_parameter_gradients_equal_single_process(group_run):
    world, cases, results = group_run
    torch.manual_seed(0)
    model = torch.nn.Linear(4, K, dtype=torch.float64)
    x1, x2 = make_ddp_inputs(world)
    loss = CrossCorrelationLoss.barlow_twins(lambd=5e-3)(model(x1), model(x2))
    loss.backward()
    for res in results:
        assert_close(res["ddp"]["loss"], loss.detach())
        assert_close(res["ddp"]["weight_grad"], model.weight.grad)
        assert_close(res["ddp"]["bias_grad"], model.bias.grad)


def test_nan_on_one_rank_is_nan_everywhere(group_run):
    world, cases, results = group_run
    for res in results:
        assert torch.isnan(res["global_nan"]["out"]).item()


def test_globally_constant_column_raises_on_every_rank(group_run):
    world, cases, results = group_run
    for res in results:
        assert "column 2 of a is constant" in res["global_constant"].get("error", "")


# ---- without a process group ------------------------------------------------------------------

def test_without_process_group_is_the_single_process_loss():
    assert not distributed.is_distributed()
    a, b = make_views(12, seed=3)
    a.requires_grad_(True)
    for kw in (FCCL, BARLOW):
        out = ops.cross_correlation_loss(a, b, gather_distributed=True, **kw)
        plain = ops.cross_correlation_loss(a, b, **kw)
        assert torch.equal(out, plain)
        for batch_stats in ("global", "local"):
            m = CrossCorrelationLoss(gather_distributed=True, batch_stats=batch_stats, **kw)
            assert torch.equal(m(a, b), plain)


def test_bad_arguments_name_themselves():
    a, b = make_views(8, seed=4)
    with pytest.raises(ValueError, match="batch_stats"):
        ops.cross_correlation_loss(a, b, gather_distributed=True, batch_stats="sync")
    with pytest.raises(ValueError, match="batch_stats"):
        CrossCorrelationLoss(batch_stats="mean")
    with pytest.raises(ValueError, match="b must have the shape of a"):
        ops.cross_correlation_loss(a, b[:, :2], gather_distributed=True)
    with pytest.raises(ValueError, match="a must be 2-D"):
        ops.cross_correlation_loss(a[0], b[0], gather_distributed=True)
    with pytest.raises(ValueError, match="eps"):
        ops.cross_correlation_loss(a, b, gather_distributed=True, eps=-1.0)


def test_repr_shows_distributed_settings():
    m = CrossCorrelationLoss.barlow_twins(gather_distributed=True, batch_stats="local")
    assert "gather_distributed=True" in repr(m) and "batch_stats='local'" in repr(m)
    assert "gather_distributed" not in repr(CrossCorrelationLoss.fccl())
    assert fcl_ext.distributed is distributed
