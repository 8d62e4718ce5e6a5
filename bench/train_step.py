"""Train GoogLeNet with its two auxiliary classifiers (loss = main + 0.3 * (aux1 + aux2), the
paper's recipe) for a few SGD steps on one synthetic batch, fused or eager, and check that the
loss goes down.

    python bench/train_step.py                    # CPU: the kernels in Triton's interpreter, batch 2 at 32x32
    python bench/train_step.py --device cuda --batch 64 --size 224 --amp bf16 --channels-last --steps 20
    python bench/train_step.py --impl eager ...   # torchvision's model, for comparison

It prints the loss and wall time of every step; the times mean something only on a GPU (and
the first steps include plan building, autotuning and torch.compile). `bench/test_training.py`
times the same step with pytest-benchmark.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(impl, device, channels_last=False, seed=0, dropout=True):
    """GoogLeNet with aux heads in train mode: "fused" (fused_inception), "eager" (torchvision) or
    "compile" (torchvision under torch.compile), from torchvision's initialisation with `seed`;
    dropout=False: without the dropout layers (so that implementations can be compared: each
    draws its masks differently)."""
    import torchvision

    from fused_inception.models import googlenet

    torch.manual_seed(seed)
    rates = {} if dropout else dict(dropout=0.0, dropout_aux=0.0)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, **rates)
    if impl == "fused":
        model = googlenet(aux_logits=True, **rates)
        model.load_state_dict(reference.state_dict())
    else:
        model = reference
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if impl == "compile" else model


def synthetic_batch(batch, size, device, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (batch,), generator=g).to(device)


def loss_of(outputs, y):
    """GoogLeNet's training loss: main classifier + 0.3 x each auxiliary classifier."""
    return (F.cross_entropy(outputs.logits, y)
            + 0.3 * (F.cross_entropy(outputs.aux_logits1, y) + F.cross_entropy(outputs.aux_logits2, y)))


def make_step(model, x, y, lr=0.01, amp=None):
    """A zero-argument callable running one training step (forward, backward, SGD with momentum);
    returns the loss tensor (no host synchronisation)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = loss_of(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["fused", "eager", "compile"], default="fused")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--amp", choices=list(AMP), default="none")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.impl == "fused":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_inception decorates its kernels

    model = make_model(args.impl, args.device, args.channels_last)
    x, y = synthetic_batch(args.batch, args.size, args.device, args.channels_last)
    step = make_step(model, x, y, args.lr, AMP[args.amp])
    losses = []
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step().item()
        losses.append(loss)
        print(f"step {i}: loss {loss:.4f}  ({time.perf_counter() - start:.3f} s)", flush=True)
    if not losses[-1] < losses[0]:
        print(f"the loss did not go down: {losses}", file=sys.stderr)
        return 1
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
