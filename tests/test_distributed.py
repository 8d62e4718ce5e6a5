"""Distributed training (gloo, 2 processes on CPU) of fused models, the kernels running through the
interpreter in every process; each rank trains on half of the batch.

- DistributedDataParallel, plain BatchNorm (statistics per rank): fused DDP trains to the
  parameters of eager DDP.
- DistributedDataParallel, a model without BatchNorm: fused DDP trains to the parameters of one
  eager process on the whole batch.
- SyncBatchNorm (nn.SyncBatchNorm.convert_sync_batchnorm on the fused model): the fused blocks
  all-reduce the BN sums between their two launches per stage and the BN backward reductions,
  so the ranks train to the parameters of one eager process on the whole batch. Gradients are
  averaged with all_reduce here, as DDP's reducer does: DDP itself refuses SyncBatchNorm in CPU
  modules ("SyncBatchNorm layers only work with GPU modules"), and eager SyncBatchNorm runs on
  GPUs only.

These compare fp32 with fp32 after two SGD steps, so a ReLU input or a max-pool near-tie within
rounding of its other decision would make the result luck. The seeds are chosen so that, in a
float64 run of the same steps, every ReLU input and every max-pool winner's lead is at least 1e-5
of its tensor's max, 15x the fp32 error of these models (asserted by
test_decisions_are_not_rounding_luck).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.googlenet import BasicConv2d, Inception

from conftest import DEVICE, TOL, Decisions, SequentialNoBN, assert_close_rel, randomize_
from fused_inception import FusedBasicConv2d, FusedInception, fuse

WORLD = 2
STEPS = 2
SEEDS = {"data": 25, "bn": 25, "no_bn": 26}  # see the module docstring


def build(fused, batchnorm=True):
    if batchnorm:
        conv, block = (FusedBasicConv2d, FusedInception) if fused else (BasicConv2d, Inception)
        stem, body, width = conv(3, 16, kernel_size=3, padding=1), block(16, 8, 8, 12, 4, 8, 8), 36
    else:
        stem, body, width = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), SequentialNoBN(16), 29
        if fused:
            body, _ = fuse(body)
    return nn.Sequential(stem, body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def data():
    g = torch.Generator().manual_seed(SEEDS["data"])
    return ([torch.randn(2 * WORLD, 3, 8, 8, generator=g) for _ in range(STEPS)],
            [torch.randint(0, 5, (2 * WORLD,), generator=g) for _ in range(STEPS)])


def train(model, xs, ys, average_gradients=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if average_gradients:  # what DDP's reducer does
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        opt.step()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank, port, initial, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        xs, ys = data()
        half = slice(rank * 2, rank * 2 + 2)
        xs, ys = [x[half] for x in xs], [y[half] for y in ys]
        results = {}
        for name, fused in (("fused", True), ("eager", False)):
            model = build(fused)
            model.load_state_dict(initial["bn"])
            train(DDP(model.train()), xs, ys)
            results[name] = state(model)
        model = build(True, batchnorm=False)
        model.load_state_dict(initial["no_bn"])
        train(DDP(model.train()), xs, ys)
        results["fused_no_bn"] = state(model)
        model = build(True)
        model.load_state_dict(initial["bn"])
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
        train(model, xs, ys, average_gradients=True)
        results["fused_sync"] = state(model)
        torch.save(results, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(initial, batchnorm):
    reference = build(False, batchnorm)
    reference.load_state_dict(initial)
    train(reference.train(), *data())
    return state(reference)


def assert_same_state(actual, expected, what):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(actual[key], value), f"{what}, {key}"
        else:
            assert_close_rel(actual[key], value, TOL[torch.float32], f"{what}, {key}")


def initial_states():
    return {"bn": state(randomize_(build(False), SEEDS["bn"])),
            "no_bn": state(randomize_(build(False, False), SEEDS["no_bn"]))}


def decision_margins(initial, batchnorm, per_rank):
    """(ReLU margin, max-pool margin) (conftest.Decisions) over the forward passes of the STEPS
    SGD steps in float64: per rank's half batch with the gradients averaged (DDP with per-rank
    BatchNorm), or the whole batch (SyncBatchNorm, and DDP without BatchNorm, compute as that)."""
    model = build(False, batchnorm)
    model.load_state_dict(initial)
    model = model.double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    relu = pool = float("inf")
    for x, y in zip(*data()):
        opt.zero_grad()
        parts = [slice(r * 2, r * 2 + 2) for r in range(WORLD)] if per_rank else [slice(None)]
        for part in parts:
            with Decisions() as decisions:
                out = model(x[part].double())
            (F.cross_entropy(out, y[part]) / len(parts)).backward()
            relu, pool = min(relu, decisions.relu_margin), min(pool, decisions.pool_margin)
        opt.step()
    return relu, pool


def test_decisions_are_not_rounding_luck():
    initial = initial_states()
    for key, batchnorm, per_rank in (("bn", True, True), ("bn", True, False), ("no_bn", False, False)):
        relu, pool = decision_margins(initial[key], batchnorm, per_rank)
        assert relu >= 1e-5 and pool >= 1e-5, (key, per_rank, relu, pool)


@pytest.mark.skipif(DEVICE != "cpu", reason="the gloo processes run on CPU through the interpreter")
def test_distributed_training_two_ranks(tmp_path):
    initial = initial_states()
    path = str(tmp_path / "result")
    mp.spawn(worker, args=(free_port(), initial, path), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(WORLD)]

    whole_batch = single_process(initial["bn"], batchnorm=True)
    for rank in ranks:
        assert_same_state(rank["fused_sync"], whole_batch, "SyncBatchNorm vs one process")
        assert_same_state(rank["fused_no_bn"], single_process(initial["no_bn"], batchnorm=False),
                          "DDP without BatchNorm vs one process")
        assert_same_state(rank["fused"], rank["eager"], "DDP, plain BatchNorm: fused vs eager")
    # Per-rank statistics do differ from the whole batch's: the comparisons above are not vacuous.
    assert not torch.allclose(ranks[0]["eager"]["4.weight"], whole_batch["4.weight"], rtol=1e-3)
