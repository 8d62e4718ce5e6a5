"""Fused modules: `FusedBlock`, the mechanism, and `FusedGraphBlock`, what fuse() swaps in (the
drop-in torchvision modules built on FusedBlock are in dropins.py).

`FusedBlock` is the mechanism. A subclass writes its math once, as `eager_forward` (torchvision's
forward, verbatim); the block's graph is recognised from it once, when the block is built
(`pattern.recipe_of`, torch.fx), and `forward` checks the input, takes the block's `route` and
runs it:

- EVAL: the fused eval forward, one launch per stage (Triton: on CUDA tensors, and on CPU
  tensors when Triton's interpreter is on, TRITON_INTERPRET=1 set before `fused_inception` is
  imported);
- EVAL_GRAD: the same while autograd records, with a backward that recomputes `eager_forward`;
- TRAIN: batch statistics in the stage launch, then normalise + activation, and a fused
  backward (`training.py`);
- EAGER: `eager_forward`, whenever the kernels would not compute what it does or could not honour
  what was asked of the module (`eager_reason` says why): float64, CPU without the interpreter,
  hooks or parametrizations on an inner module, a BatchNorm switched to batch statistics,
  torch.fx / torch.jit tracing, ONNX export, torch.func transforms, ...

Under torch.autocast (fp16/bf16) the kernels compute in the autocast dtype, as eager autocast
convolutions do: the input is cast, weights are laid out in that dtype (one cached plan per
compute dtype), accumulation and the folded BN stay fp32, and the output has the autocast dtype.

A block follows changes made to it after it was built (`watch.py`: structure; `BlockProgram._stamp`:
the tensors its modules hold, read at call time, so `torch.func.functional_call` and
`torch.utils.swap_tensors` are seen).
"""

import threading

import torch
from torch import fx, nn
import torch.autograd.forward_ad as _forward_ad

from fused_inception import ops
from fused_inception.pattern import NotABlock, recipe_of
from fused_inception.graph import UnsupportedBlock
from fused_inception.program import BlockProgram, Route, compute_dtype, eager_gradients
from fused_inception.watch import Watch

_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_REFRESHING = threading.RLock()  # a block catching up with a change (rare): one at a time


def check_input(x, in_channels, like, name):
    """Raise a clear error unless x is a 4-D floating tensor with `in_channels` channels, on the
    device and of the dtype of the parameter `like`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input (float32, float16 or bfloat16), got {x.dtype}")
    if x.device != like.device:
        raise RuntimeError(f"{name}: input is on {x.device} but the block's parameters are on {like.device}; "
                           f"move one with .to()")
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: input dtype {x.dtype} does not match the block's parameters ({like.dtype}); "
                        f"convert the input or the module with .to(dtype)")


def _transformed(x):
    """A torch.func transform (vmap, grad, jvp, ...) or forward-mode AD is active for x. (The
    forward's fast path tests x and forward AD only: a transform over the parameters alone
    changes the tensors the block holds, which sends it to the slow path.)"""
    return (_is_functorch_wrapped(x) or _forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


class _EvalFunction(torch.autograd.Function):
    """Fused forward; backward recomputes the eager graph with the tensors the forward used (eval
    BatchNorm is affine, nothing is updated)."""

    @staticmethod
    def forward(ctx, block, x, *tensors):
        ctx.block = block
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *tensors)  # saved: autograd refuses a backward after in-place updates
        return block._program.run(x.to(compute_dtype(x)))

    @staticmethod
    def backward(ctx, grad):
        x, *tensors = ctx.saved_tensors
        if ctx.block.training:
            raise RuntimeError(f"{type(ctx.block).__name__} was switched to train() between an eval forward and its "
                               "backward; the recomputed graph would use batch statistics")
        device_type, autocast, dtype = ctx.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            return (None,) + eager_gradients(ctx.block, x, tensors, grad, ctx.needs_input_grad[1:])


class FusedBlock(nn.Module):
    """Base class of the fused modules.

    A subclass builds its submodules, defines `eager_forward(x)` (the reference math) and calls
    `self._init_fused()` at the end of `__init__`, which recognises the block from `eager_forward`
    (raising `UnsupportedBlock` with the reason if it can't be fused). The block's
    `fused_inception.program.BlockProgram` holds its plans; `forward` checks the input, takes the
    `route` and runs it.
    """

    _is_fused_block = True  # fx leaves for fuse(), which skips these

    def _init_fused(self, recipe=None):
        self._recipe = recipe if recipe is not None else self._trace_recipe()
        self._program = BlockProgram(self._recipe, self, self._fingerprint_root())
        self._in_channels = self._program.in_channels
        self._watch = Watch(self, self._fingerprint_root())
        self._broken = None  # why a change made the block unfusable (it then runs eagerly)
        self._fast = None  # (dtype, device, device type) of the last plain eval forward: see forward

    def _trace_recipe(self):
        return recipe_of(self, "eager_forward", allow_single=True)

    def _fingerprint_root(self):
        return self  # the module whose forward was traced

    def _refresh(self):
        """Catch up with changes made to the block since its program was built (see watch.py):
        the new program is in place before the new snapshot, so a concurrent forward that sees
        the snapshot current runs the program that goes with it."""
        if self._watch.current():
            return
        with _REFRESHING:
            if self._watch.current():
                return  # (another thread did it)
            change, watch = self._watch.diff(self, self._fingerprint_root())
            if change is not None and watch.reason is None:
                try:
                    if change == "retrace":
                        self._recipe = self._trace_recipe()
                    self._program, self._broken = BlockProgram(self._recipe, self, self._fingerprint_root()), None
                except (UnsupportedBlock, NotABlock) as e:
                    self._broken = f"changed after it was built, it can't be fused any more: {e}"
            self._fast = None
            self._watch = watch

    def __getstate__(self):  # copy.deepcopy and pickling: the program is rebuilt for the copy
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        for name in ("_program", "_watch", "_fast"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        try:
            self._init_fused(self._recipe)
        except (UnsupportedBlock, NotABlock) as e:  # a copy of a block a change made unfusable: eager too
            self._program, self._fast = None, None
            self._watch = Watch(self, self._fingerprint_root())
            self._broken = self._broken or f"changed after it was built, it can't be fused any more: {e}"

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replica shares this block's __dict__ (its program reads this block's
        # tensors, on the first device): the replica runs its eager graph on its own tensors.
        replica = super()._replicate_for_data_parallel()
        replica._program, replica._fast = None, None
        replica._broken = "a DataParallel replica runs the eager graph (DistributedDataParallel runs the kernels)"
        return replica

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): plans for the new tensors
        result = super()._apply(fn, recurse)
        self.invalidate_plan()
        return result

    def eager_forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _current_program(self):
        self._refresh()
        if self._program is None:
            raise UnsupportedBlock(self._broken)
        return self._program

    def graph(self):
        """The block's `plan.BlockGraph` over its current submodules."""
        return self._current_program().graph

    @property
    def launches(self):
        """Kernel launches of a fused eval forward: the number of stages (the longest chain)."""
        return self._recipe.launches

    def _tracked_params(self):
        return [p for m in self.modules() for p in m._parameters.values() if p is not None]

    def invalidate_plan(self):
        """Drop the cached plans (rebuilt on the next fused forward): after writing to a
        parameter or buffer through `.data` in place (which no version counter sees)."""
        if self._program is not None:
            self._program.invalidate()
            self._program.invalidate_training()
        self._fast = None

    def plan(self, dtype=None):
        """The current inference plan for this block's parameters, computing in `dtype`
        (default: the parameters'), built or taken from the cache."""
        program, like = self._current_program(), self._tracked_params()[0]
        return program.plan(dtype or like.dtype, like.device)

    def train_plan(self, dtype, device):
        """The training plan for inputs of `dtype` on `device` (built or taken from the cache)."""
        return self._current_program().train_plan(dtype, device)

    def eager_reason(self, x, compiling=False):
        """Why forward(x) would run the eager graph now (a sentence), or None when it runs the
        fused kernels. `compiling`: under torch.compile / torch.export (see `route`)."""
        return self._route(x, compiling)[1]

    def uses_kernels(self, x):
        """True if forward(x) would run the Triton kernels (not the eager graph)."""
        return self._route(x)[1] is None

    def route(self, x, compiling=False):
        """How forward(x) computes now (a `Route`): the one decision that both the eager and the
        compiled forward (`compiling`) take; EAGER whenever `eager_reason(x)` gives a reason."""
        return self._route(x, compiling)[0]

    def _route(self, x, compiling=False):
        if isinstance(x, fx.Proxy):
            return Route.EAGER, "torch.fx is tracing: the eager graph is what it records"
        if not compiling:
            self._refresh()
            if torch.jit.is_tracing():
                return Route.EAGER, "torch.jit.trace (or the TorchScript ONNX exporter) records the eager graph"
            if _transformed(x):
                return Route.EAGER, "a torch.func transform or forward-mode AD is active: the kernels have no rule for it"
        if (not compiling or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export():
            return Route.EAGER, "ONNX export records the eager graph (ONNX has no fused-kernel operator)"
        reason = self._watch.reason or self._watch.hooks_reason() or self._broken
        if reason is not None:  # (a block without a program is broken: the reason says why)
            return Route.EAGER, reason
        return self._program.route(x, self.training, compiling)

    def forward(self, x):
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        fast = self._fast
        # The common case, a plain eval forward (no autograd, autocast, hooks, tracing or
        # transforms), in a few microseconds: the same input dtype, device and channels as the
        # last one, nothing changed in the block, the plan current for the tensors it holds.
        if (fast is not None and type(x) is torch.Tensor and x.dtype is fast[0] and x.device == fast[1]
                and x.dim() == 4 and x.shape[1] == self._in_channels and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(fast[2]) and self._watch.unchanged()
                and torch._C._get_tracing_state() is None and not _is_functorch_wrapped(x)
                and _forward_ad._current_level < 0):
            plan = self._program.fresh_plan(x.dtype)
            if plan is not None:
                return plan.run(x)
        self._fast = None
        if not isinstance(x, fx.Proxy):
            check_input(x, self._in_channels, self._tracked_params()[0], type(self).__name__)
        route = self.route(x)  # (which catches up with changes made to the block first)
        if route is Route.EAGER:
            return self.eager_forward(x)
        if route is Route.EVAL_GRAD:
            return _EvalFunction.apply(self, x, *self._program.held())
        if route is Route.EVAL and compute_dtype(x) is x.dtype:
            self._fast = (x.dtype, x.device, x.device.type)
        return self._program.forward(route, x.to(compute_dtype(x)))  # (x.to keeps the memory format)

    def _traced_forward(self, x):
        """forward under torch.compile / torch.export: the same route, each fused path one opaque
        custom op (ops.compiled_forward)."""
        check_input(x, self._in_channels, next(self.parameters()), type(self).__name__)
        if not torch.compiler.is_dynamo_compiling():  # torch.export runs this as Python: catch up
            self._refresh()
        route = self.route(x, compiling=True)
        if route is Route.EAGER:
            return self.eager_forward(x)
        dtype = compute_dtype(x)
        return ops.compiled_forward(self._program, route, x if dtype is x.dtype else x.to(dtype))


def build_plans(model, dtype=None, example=None):
    """Build the plan of every fused block in `model` now (as its first fused forward would;
    for a block in train() also its training plan): before timing, counting launches, or
    capturing a CUDA graph. Returns the number of blocks.

    example: an input on a GPU: one forward of it (eval, without autograd) also prepares each
    stage's launch for its shape and autotunes the kernels, which a CUDA-graph capture can't do
    and which would otherwise happen inside the first timed or counted call. (Elsewhere nothing
    is tuned: skipped. A model in train() tunes on its first training step.)

    Example:
        >>> fused_inception.build_plans(model, example=x)   # then torch.cuda.graph(...) capture
    """
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    for block in blocks:
        block.plan(dtype)
        if block.training:  # and the training plan, for the dtype the kernels would compute in
            like = block._tracked_params()[0]
            block.train_plan(dtype or like.dtype, like.device)
    if example is not None and example.is_cuda and not model.training:
        with torch.no_grad():
            model(example)
    return len(blocks)


_MODULE_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")


class FusedGraphBlock(FusedBlock):
    """A user's module recognised by `fuse()`, run through the stage kernel.

    It shares the original module's submodules, parameters and buffers (the same objects, under
    the same names: state_dict keys, optimizers and load_state_dict keep working) and uses the
    original's own forward as its eager path.
    """

    def __init__(self, original, recipe):
        super().__init__()
        self._modules = original._modules
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        for name in _MODULE_HOOKS:  # hooks registered on the original stay registered (and removable)
            self.__dict__[name] = original.__dict__[name]
        self._is_full_backward_hook = original._is_full_backward_hook
        self.training = original.training
        object.__setattr__(self, "_original", original)  # not a child: no duplicate keys
        self._init_fused(recipe)

    def eager_forward(self, x):
        return self._original.forward(x)

    def _trace_recipe(self):
        return recipe_of(self._original, allow_single=self._recipe.single)

    def _fingerprint_root(self):
        return self._original  # its own attributes (e.g. a residual scale)

    def train(self, mode=True):
        self._original.training = mode
        return super().train(mode)

    def extra_repr(self):
        return f"fused {type(self._original).__name__}: {self.launches} launches"
