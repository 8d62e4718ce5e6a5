"""One GoogLeNet training step (aux heads, forward + backward + SGD): eager vs torch.compile vs fused.

GPU: batch 64 at 224x224, bf16 autocast, channels_last. CPU (interpreter): batch 2 at 32x32,
fp32, with --benchmark-disable (checks that the step runs and agrees; times mean nothing).
"""

import pytest
import torch

import cases
from train_step import make_model, make_step, synthetic_batch

DEVICE = cases.DEVICE
BATCH, SIZE = (64, 224) if cases.ON_GPU else (2, 32)
AMP = {"bf16": torch.bfloat16} if cases.ON_GPU else {"fp32": None}
IMPLS = ["eager", "compile", "fused"] if cases.ON_GPU else ["eager", "fused"]


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
    tolerance = cases.TOL[dtype]  # (both losses in the step's dtype)
    assert abs(first - reference_loss) <= tolerance * abs(reference_loss), (impl, first, reference_loss)
    benchmark.extra_info.update(impl=impl, network="googlenet-train", batch=BATCH, dtype=dtype,
                                layout="channels_last", input=[BATCH, 3, SIZE, SIZE],
                                first_loss=first, reference_first_loss=reference_loss)
    if not cases.ON_GPU:  # one more step (a fused one takes ~30 s in the interpreter), its launches counted
        benchmark.extra_info["launches"] = benchmark.pedantic(cases.counted_run, args=(step, impl, DEVICE),
                                                              rounds=1)[1]
        return
    for _ in range(3):  # warm-up: plans, autotuning, compilation
        step()
    benchmark.extra_info["launches"] = cases.counted_run(step, impl, DEVICE)[1]
    import triton.testing

    k = 5

    def rounds():
        for _ in range(k):
            step()
        torch.cuda.synchronize()

    benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(step, warmup=5, rep=200)
    benchmark.extra_info["forwards_per_round"] = k  # steps per round (report.py divides by it)
    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2)
