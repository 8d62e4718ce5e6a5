"""The fused block forward as a PyTorch custom op, so torch.compile sees one opaque node per block.

`torch.compile(model, fullgraph=True)` traces a fused model in inference (no autograd recording)
without graph breaks: each FusedBlock becomes a call to `fused_inception::block_forward(x, block)`,
whose fake (meta) implementation gives the output's shape and memory format. At run time the op
looks the block up by id and runs its current plan, so weight updates after compilation are seen
(the plan's version check runs inside the op). When autograd records (training, or eval with
gradients), a compiled block traces its eager graph instead: correct gradients, not fused.
Under CUDA graphs (`mode="reduce-overhead"`) launches are replayed as captured: capture again
after changing weights, as with any captured graph.
"""

import itertools
import weakref

import torch

_BY_ID = weakref.WeakValueDictionary()
_counter = itertools.count()


def register(block):
    """A new process-wide integer naming `block`; FusedBlock keeps it as `_op_id` (and takes a
    new one when copied or unpickled, so a copy never runs the original's plan)."""
    i = next(_counter)
    _BY_ID[i] = block
    return i


def _block(i):
    block = _BY_ID.get(i)
    if block is None:
        raise RuntimeError(f"fused_inception: block {i} no longer exists (a compiled graph outlived its model)")
    return block


@torch.library.custom_op("fused_inception::block_forward", mutates_args=())
def block_forward(x: torch.Tensor, block: int) -> torch.Tensor:
    """Eval-mode fused forward of the FusedBlock registered as `block` (see register)."""
    return _block(block)._run_plan(x)


@block_forward.register_fake
def _(x, block):
    from fused_inception.blocks import output_memory_format
    from fused_inception.plan import output_shape

    shape = output_shape(_block(block).graph(), x.shape[0], x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
