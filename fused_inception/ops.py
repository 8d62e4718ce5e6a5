"""The fused block as PyTorch custom ops, so torch.compile sees one opaque node per block.

`torch.compile(model, fullgraph=True)` traces a fused model without graph breaks:

- inference (no autograd recording): each FusedBlock is `fused_inception::block_forward(x,
  program)`, whose fake (meta) implementation gives the output's shape and memory format;
- eval mode while autograd records (`torch.export.export(model.eval(), (x,))` with grad enabled,
  compiling a model whose parameters require grad): `fused_inception::block_eval_forward(x,
  tensors, program)`, the same forward, with an autograd formula (`block_eval_backward`: the
  block's eager graph recomputed with `tensors` in its slots), so the exported or compiled graph
  keeps one fused op per block;
- training: `fused_inception::block_train_forward` and `fused_inception::block_train_backward`,
  joined by `register_autograd`. Both are functional: the running statistics are updated by
  traced torch ops (`_foreach_lerp_`) from the forward's `saved` output.

The ops take the block's program (fused_inception.program.BlockProgram) by id, never the
module. At run time an op looks the program up and runs its current plan, so weight updates
after compilation are seen: an exported program runs in the process that holds its model (it is
not a self-contained artifact to save and load elsewhere). Under CUDA graphs (`mode="reduce-overhead"`) launches are
replayed as captured: capture again after changing weights, as with any captured graph.

In eager mode (no compile) the blocks call the same forward and backward through a
torch.autograd.Function instead: a custom op call costs about 100 us more host time
(measured on this project's CPU machine: 125 vs 23 us).
"""

from typing import List, Tuple

import torch

from fused_inception import norms
from fused_inception.graph import output_shape
from fused_inception.plan import output_memory_format
from fused_inception.program import Route, eager_gradients, lookup


def compiled_forward(program, route, x):
    """A fused block's forward under torch.compile / torch.export on `route` (EVAL, EVAL_GRAD or
    TRAIN; x already in the compute dtype): one custom op below, and in training the running
    statistics updated by traced torch ops from its `saved` output."""
    if route is Route.TRAIN:
        out, _, _, saved = block_train_forward(x, program.train_params(), program.running_means(), program.id)
        norms.update_running_stats(program.train_bns, saved)
        return out
    if route is Route.EVAL_GRAD:
        return block_eval_forward(x, program.held(), program.id)
    return block_forward(x, program.id)


@torch.library.custom_op("fused_inception::block_forward", mutates_args=())
def block_forward(x: torch.Tensor, program: int) -> torch.Tensor:
    """Eval-mode fused forward of the block program registered as `program` (program.lookup)."""
    return lookup(program).run(x)


def _output_like(x, program):
    """The block output for x, empty: the eval ops' fake implementation."""
    shape = output_shape(lookup(program).graph, x.shape[0], x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


block_forward.register_fake(_output_like)


# Eval mode with autograd recording (torch.export's default, torch.compile of a model whose
# parameters require grad): the fused forward, and a backward that recomputes the block's eager
# graph (eval BatchNorm is affine, nothing is updated), as _EvalFunction does in eager mode. The
# block's parameters and buffers (`tensors`) are inputs so that autograd (and export) see what the
# output depends on, and the backward recomputes with them; the forward, like block_forward, runs
# the block's current plan (its own tensors: functional_call under torch.compile is not supported).


@torch.library.custom_op("fused_inception::block_eval_forward", mutates_args=())
def block_eval_forward(x: torch.Tensor, tensors: List[torch.Tensor], program: int) -> torch.Tensor:
    """Eval-mode fused forward of the block program `program` when autograd records: `tensors`
    are what the block's parameter and buffer slots hold (BlockProgram.held), for the backward."""
    return lookup(program).run(x)


block_eval_forward.register_fake(lambda x, tensors, program: _output_like(x, program))


def _autograd_inside_an_op():
    """Autograd back on inside a custom op's implementation (the dispatcher runs it below the
    autograd keys, so no graph would be recorded): for the eager recompute of block_eval_backward."""
    C, K = torch._C, torch._C.DispatchKey
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradOther, K.AutogradNestedTensor, K.AutogradCPU, K.AutogradCUDA, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("fused_inception::block_eval_backward", mutates_args=())
def block_eval_backward(grad: torch.Tensor, x: torch.Tensor, tensors: List[torch.Tensor], program: int,
                        needs: List[bool]) -> List[torch.Tensor]:
    """Backward of block_eval_forward: the gradients of [x, *tensors] (an empty tensor where
    `needs` says not needed), from the block's eager graph recomputed under autograd with `tensors`
    in its slots."""
    block = lookup(program).owner()
    with _autograd_inside_an_op():
        grads = eager_gradients(block, x, tensors, grad, needs)
    return [(torch.zeros_like(t) if g is None else g) if need else t.new_empty(0)
            for t, g, need in zip([x, *tensors], grads, needs)]


@block_eval_backward.register_fake
def _(grad, x, tensors, program, needs):
    return [torch.empty_like(t) if need else t.new_empty(0) for t, need in zip([x, *tensors], needs)]


def _eval_setup_context(ctx, inputs, output):
    x, tensors, program = inputs
    ctx.program = program
    ctx.needs = [x.requires_grad] + [t.requires_grad for t in tensors]
    ctx.save_for_backward(x, *tensors)


def _eval_backward(ctx, grad):
    x, *tensors = ctx.saved_tensors
    flat = block_eval_backward(grad, x, tensors, ctx.program, ctx.needs)
    return (flat[0] if ctx.needs[0] else None), [g if need else None for g, need in zip(flat[1:], ctx.needs[1:])], None


block_eval_forward.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# Training: the fused forward and backward as two custom ops, joined by register_autograd. They are
# functional (the running statistics are updated by the caller from the `saved` output), so
# torch.compile(fullgraph=True) traces a training step of a fused model without graph breaks.


def _train_layout(program):
    """The program's training plan structure (meta tensors), for fake implementations."""
    return lookup(program).train_structure


@torch.library.custom_op("fused_inception::block_train_forward", mutates_args=())
def block_train_forward(x: torch.Tensor, params: List[torch.Tensor], centers: List[torch.Tensor],
                        program: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of the block program registered as `program`, computing in x's dtype:
    (out, raw_out, raw_mid, saved), see fused_inception.training.forward. `params` are the
    block's parameters in its packing order (BlockProgram.train_params), `centers` its
    BatchNorms' running means."""
    from fused_inception import training

    p = lookup(program)
    plan = p.train_plan(x.dtype, x.device)
    out, raw_out, raw_mid, saved, _ = training.forward(plan, x, params, centers, p.sync_group(),
                                                       output_memory_format(x))
    if raw_mid is raw_out:  # outputs may not alias: no intermediate results, an empty tensor
        raw_mid = raw_out.new_empty(0)
    return out, raw_out, raw_mid, saved


@block_train_forward.register_fake
def _(x, params, centers, program):
    from fused_inception.training import accumulator_dtype

    structure = _train_layout(program)
    out, mid = structure.layout.buffers(x, x.dtype, output_memory_format(x))
    raw_mid = torch.empty_like(mid) if mid is not out else x.new_empty(0)
    saved = x.new_empty((4, structure.columns), dtype=accumulator_dtype(x.dtype))
    return out, torch.empty_like(out), raw_mid, saved


@torch.library.custom_op("fused_inception::block_train_backward", mutates_args=())
def block_train_backward(grad_out: torch.Tensor, x: torch.Tensor, raw_out: torch.Tensor, raw_mid: torch.Tensor,
                         saved: torch.Tensor, out: torch.Tensor, params: List[torch.Tensor], program: int,
                         need_x: bool) -> List[torch.Tensor]:
    """Backward of block_train_forward: [dx (empty unless need_x), then per convolution problem
    its weight and bias gradients, then the BN sums [2, columns]]."""
    from fused_inception import training

    p = lookup(program)
    plan = p.train_plan(x.dtype, x.device)
    if raw_mid.numel() == 0 and plan.layout.mid_channels == 0:
        raw_mid = raw_out
    launches = plan.launches(x, raw_out, raw_mid, output_memory_format(x))  # (the forward's: same shapes)
    dx, weight_grads, bias_grads, sums = training.backward(plan, launches, x, raw_out, raw_mid, saved, out, params,
                                                           grad_out, p.sync_group(), need_x)
    if need_x and dx.stride() != x.stride():  # the layout the fake implementation states
        dx = torch.empty_like(x).copy_(dx)
    flat = [dx if need_x else x.new_empty(0)]
    for w, g in zip(weight_grads, bias_grads):
        if w is not None:
            flat += [w, g]
    return flat + [sums]


@block_train_backward.register_fake
def _(grad_out, x, raw_out, raw_mid, saved, out, params, program, need_x):
    from fused_inception.training import accumulator_dtype

    structure = _train_layout(program)
    flat = [torch.empty_like(x) if need_x else x.new_empty(0)]
    for p in structure.problems:
        if p.gemm:
            flat += [x.new_empty((p.ncols, p.row["cin"], p.row["kh"], p.row["kw"])), x.new_empty((p.ncols,))]
    return flat + [x.new_empty((2, structure.columns), dtype=accumulator_dtype(x.dtype))]


def _train_setup_context(ctx, inputs, output):
    x, params, centers, program = inputs
    ctx.program, ctx.n_centers = program, len(centers)
    ctx.save_for_backward(x, *output, *params)


def _train_backward(ctx, grad_out, *unused):
    x, out, raw_out, raw_mid, saved, *params = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    need_x = ctx.needs_input_grad[0]
    flat = block_train_backward(grad_out, x, raw_out, raw_mid, saved, out, params, ctx.program, need_x)
    structure = _train_layout(ctx.program)
    weight_grads, bias_grads, it = [], [], iter(flat[1:-1])
    for p in structure.problems:
        w, b = (next(it), next(it)) if p.gemm else (None, None)
        weight_grads.append(w)
        bias_grads.append(b)
    grads = structure.param_grads(params, weight_grads, bias_grads, flat[-1])
    return (flat[0] if need_x else None), grads, [None] * ctx.n_centers, None


block_train_forward.register_autograd(_train_backward, setup_context=_train_setup_context)
