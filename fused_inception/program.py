"""A fused block's program: the plans its forward runs, built from its graph, kept while valid.

Data flows one way:

    blocks.FusedBlock.forward   check the input, pick the path (eager, eval kernels, training)
      -> BlockProgram           the block's graph; its inference plan per compute dtype, rebuilt
                                when a tensor it folded changes; its training plans
        -> plan.Plan / training.TrainPlan     stages, weights in kernel layout, launches
          -> kernels.conv / kernels.batchnorm the kernels and their launchers

`ops.py` (torch.compile's custom ops) reaches programs by id through `lookup`, never modules.

A program holds references to the block's submodules (through its `BlockGraph`), not to the
block. The block makes a new program when its structure changes (a submodule replaced, a
geometry attribute changed); the program rebuilds a plan when the values it folded change
(in-place updates bump tensor versions: optimizer steps, load_state_dict, running statistics;
`.to()` and `.data =` change data pointers).
"""

import itertools
import operator
import weakref

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fused_inception import norms, training
from fused_inception.plan import build_plan, check_graph

_VERSION = operator.attrgetter("_version")

_BY_ID = weakref.WeakValueDictionary()
_ids = itertools.count()


def lookup(program_id):
    """The BlockProgram registered under `program_id` (see BlockProgram.id)."""
    program = _BY_ID.get(program_id)
    if program is None:
        raise RuntimeError(f"fused_inception: program {program_id} no longer exists (a compiled graph outlived "
                           "its model, or the block's structure changed after compiling)")
    return program


def _graph_tensors(graph):
    """The parameters and buffers a plan of `graph` folds, and the residual scale if a tensor."""
    modules = [m for node in graph.nodes for m in (node.conv, node.bn) if m is not None]
    if graph.head is not None:
        modules.append(graph.head.conv)
    tensors = [t for m in modules for name, t in [*m._parameters.items(), *m._buffers.items()]
               if t is not None and name != "num_batches_tracked"]  # (not folded)
    if graph.head is not None and isinstance(graph.head.scale, torch.Tensor):
        tensors.append(graph.head.scale)
    return tuple(tensors)


class BlockProgram:
    """What a fused block runs: built from its traced recipe over its current submodules.

    Attributes: `graph` (plan.BlockGraph), `id` (for torch.compile's custom ops), and for a
    training forward `train_structure` (the training plan's layout on the meta device),
    `train_refs` ((module, attribute) of each parameter in packing order) and `train_bns`
    ((BatchNorm, first column, last column) per BatchNorm).
    """

    def __init__(self, recipe, module):
        graph = recipe.graph(module)
        check_graph(graph)  # an unfusable block fails here, not at its first forward
        self.recipe = recipe
        self.graph = graph
        self.in_channels = graph.in_channels
        # What a training forward gathers, as plain references (torch.compile traces this; fake
        # implementations read the structure while tracing: real meta tensors).
        with unset_fake_temporarily():
            structure = training.build_train_plan(graph, torch.device("meta"), torch.float32, torch.float32)
        self.train_structure = structure
        self.train_refs = tuple(ref for ref in structure.refs(graph) if ref is not None and getattr(*ref) is not None)
        self.train_bns = tuple((training.member_modules(graph, m)[1], lo, hi) for m, lo, hi in structure.bn_columns)
        # Frozen BatchNorms and norm + act layers with a dropout: see norms.needs_eager.
        self.special_bns = tuple(bn for bn, _, _ in self.train_bns if not norms.is_plain(bn))
        self._tensors = _graph_tensors(graph)
        self._plans = {}  # compute dtype -> (stamp, Plan)
        self._train_plans = {}
        self._owner = weakref.ref(module)  # the block, for the eval backward's eager recompute (ops.py)
        self.id = next(_ids)
        _BY_ID[self.id] = self

    def stamp(self):
        """What the inference plans are derived from, besides the structure (which the block
        checks): each tensor's version, bumped by every in-place update (optimizer steps,
        load_state_dict, running statistics). Tensors made under torch.inference_mode have no
        version counter (and can't be updated in place outside it): their data pointer.
        `.to()` on the block or a module above it makes a new program; writes through `.data`
        (and `.to()` on a single submodule) need `invalidate_plan()`."""
        try:
            return tuple(map(_VERSION, self._tensors))
        except RuntimeError:
            return tuple(t.data_ptr() if t.is_inference() else t._version for t in self._tensors)

    def plan(self, dtype, device):
        """The inference plan computing in `dtype`, current for the tensors' values."""
        stamp = self.stamp()
        cached = self._plans.get(dtype)
        if cached is None or cached[0] != stamp:
            cached = self._plans[dtype] = (stamp, build_plan(self.graph, device, dtype))
        return cached[1]

    def run(self, x, memory_format=None):
        """The fused eval forward of x (already in the compute dtype): the block output."""
        cached = self._plans.get(x.dtype)
        if cached is None or cached[0] != self.stamp():
            return self.plan(x.dtype, x.device).run(x, memory_format)
        return cached[1].run(x, memory_format)

    def owner(self):
        """The fused block this program belongs to (its eager_forward and parameters)."""
        block = self._owner()
        if block is None:
            raise RuntimeError(f"fused_inception: the block of program {self.id} no longer exists")
        return block

    def invalidate(self):
        """Drop the inference plans (rebuilt on the next forward); `training` too: the
        training plans."""
        self._plans = {}

    def invalidate_training(self):
        self._train_plans = {}

    # Training --------------------------------------------------------------------------------

    def residual_scale(self):
        """The residual head's scale (a number or a tensor), or None for a concat block."""
        return self.graph.head.scale if self.graph.head is not None else None

    def train_params(self):
        return [getattr(module, name) for module, name in self.train_refs]

    def running_means(self):
        return [bn.running_mean for bn, _, _ in self.train_bns]

    def sync_group(self):
        """The process group the block's BatchNorm statistics are all-reduced over, or None."""
        return training.sync_group([bn for bn, _, _ in self.train_bns])

    def train_plan(self, dtype, device):
        """The training plan for inputs of `dtype` on `device` (built or taken from the cache)."""
        param_dtype = getattr(*self.train_refs[0]).dtype
        scale = self.residual_scale()
        # A residual scale held in a buffer is read when the plan is built.
        scale_key = (id(scale), scale._version) if isinstance(scale, torch.Tensor) else scale
        key = (device, dtype, param_dtype, scale_key)
        plan = self._train_plans.get(key)
        if plan is None:
            plan = self._train_plans[key] = training.build_train_plan(self.graph, device, dtype, param_dtype)
        return plan


def eager_gradients(block, x, params, grad, needs):
    """The gradients of the block's eager graph at x (eval), for `grad` of its output: one per
    tensor of [x, *params] (the block's own parameters), None where `needs` says not needed
    (or nothing depends on it). The fused eval forward's backward, in eager mode
    (blocks._EvalFunction) and under torch.compile / torch.export (ops.block_eval_backward)."""
    with torch.enable_grad():
        xd = x.detach().requires_grad_(needs[0])
        y = block.eager_forward(xd)
    wanted = [t for t, need in zip([xd] + list(params), needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)
