"""One GoogLeNet training step (aux heads, forward + backward + SGD): eager vs torch.compile vs fused.

GPU: batch 64 at 224x224, bf16 autocast, channels_last. CPU (interpreter): batch 2 at 32x32,
fp32, with --benchmark-disable (checks that the step runs and agrees; times mean nothing).
"""

import pytest
import torch

from cases import ON_GPU
from train_step import make_model, make_step, synthetic_batch
from fused_inception import count_launches
from fused_inception.launches import count_torch_kernels

DEVICE = "cuda" if ON_GPU else "cpu"
BATCH, SIZE = (64, 224) if ON_GPU else (2, 32)
AMP = {"bf16": torch.bfloat16} if ON_GPU else {"fp32": None}
IMPLS = ["eager", "compile", "fused"] if ON_GPU else ["eager", "fused"]


def counted(step, impl):
    """(loss, launches) of one step: Triton launches + torch kernels for eager/fused; the CUDA
    profiler's kernel count for compiled code on a GPU."""
    if impl != "compile":
        with count_launches() as n, count_torch_kernels() as k:
            loss = step()
        return loss, n.value + k.value
    if not ON_GPU:
        return step(), None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = step()
        torch.cuda.synchronize()
    return loss, sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(AMP))
def test_googlenet_training_step(benchmark, impl, dtype):
    x, y = synthetic_batch(BATCH, SIZE, DEVICE, channels_last=True)
    # The first step of every implementation from the same weights and batch gives the same loss.
    # No dropout: torch.compile draws its masks with another generator.
    reference_loss = make_step(make_model("eager", DEVICE, True, dropout=False), x, y, amp=AMP[dtype])().item()
    model = make_model(impl, DEVICE, channels_last=True, dropout=False)
    step = make_step(model, x, y, amp=AMP[dtype])
    first = step().item()
    tolerance = 2e-2 if AMP[dtype] is not None else 1e-4
    assert abs(first - reference_loss) <= tolerance * abs(reference_loss), (impl, first, reference_loss)
    benchmark.extra_info.update(impl=impl, network="googlenet-train", batch=BATCH, dtype=dtype,
                                layout="channels_last", input=[BATCH, 3, SIZE, SIZE],
                                first_loss=first, reference_first_loss=reference_loss)
    if not ON_GPU:  # one more step (a fused one takes ~30 s in the interpreter), its launches counted
        benchmark.extra_info["launches"] = benchmark.pedantic(counted, args=(step, impl), rounds=1)[1]
        return
    for _ in range(3):  # warm-up: plans, autotuning, compilation
        step()
    benchmark.extra_info["launches"] = counted(step, impl)[1]
    import triton.testing

    k = 5

    def rounds():
        for _ in range(k):
            step()
        torch.cuda.synchronize()

    benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(step, warmup=5, rep=200)
    benchmark.extra_info["forwards_per_round"] = k  # steps per round (report.py divides by it)
    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2)
