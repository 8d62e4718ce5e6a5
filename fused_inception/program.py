"""A fused block's program: the plans its forward runs, built from its graph, kept while valid.

Data flows one way:

    blocks.FusedBlock.forward   check the input, take the route (eager, eval kernels, training)
      -> BlockProgram           the block's graph (graph.BlockGraph, recognised once by
                                pattern.py); its inference plan per compute dtype, rebuilt when
                                a tensor it folded changes; its training plans
        -> plan.build_stages    ONE stage builder, given a packing: plan.build_plan (INFERENCE:
                                BN folded, weights padded) or training.build_train_plan (TRAINING:
                                the parameters' layout, statistics in the kernels)
          -> plan.Plan / training.TrainPlan  the stages and, per input shape, their cached
                                launches (kconv.StageLaunch; training also kbn.ApplyLaunch and
                                kbn.BackwardLaunch: every one a kconv.CachedLaunch)
            -> kernels.conv / kernels.batchnorm   the kernels (activations: kconv._activate)

`ops.py` (torch.compile's custom ops) reaches programs by id through `lookup`, never modules.

A program holds references to the block's submodules (through its `BlockGraph`) and a weak one
to the block. The block makes a new program when its structure changes (see watch.py); the
program rebuilds a plan when a tensor it could fold changes: another tensor in a slot
(functional_call, swap_tensors, assignment) or an in-place update (a version bump: optimizer
steps, load_state_dict, running statistics). Writes through `.data` (in place, or `.data =`,
as `torch.nn.utils.vector_to_parameters` does) change neither: `invalidate_plan()` after them.
"""

import contextlib
import enum
import itertools
import operator
import weakref

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fused_inception import norms, training
from fused_inception.kernels import conv as kconv
from fused_inception.graph import check_graph
from fused_inception.plan import build_plan, output_memory_format

_VERSION = operator.attrgetter("_version")
_IMPL = operator.attrgetter("_cdata")  # the C++ tensor: torch.utils.swap_tensors changes it, not id()

_BY_ID = weakref.WeakValueDictionary()
_ids = itertools.count()


def lookup(program_id):
    """The BlockProgram registered under `program_id` (see BlockProgram.id)."""
    program = _BY_ID.get(program_id)
    if program is None:
        raise RuntimeError(f"fused_inception: program {program_id} no longer exists (a compiled graph outlived "
                           "its model, or the block's structure changed after compiling)")
    return program


class Route(enum.Enum):
    """How a fused block's forward computes (`FusedBlock.route`)."""

    EAGER = "eager"  # the block's eager graph: torch ops
    EVAL = "eval"  # the fused eval forward, one launch per stage
    EVAL_GRAD = "eval+grad"  # the same; its backward recomputes the eager graph
    TRAIN = "train"  # the fused training forward and backward (training.py)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available_for(x):
    """True if the stage kernel can run on x's device: CUDA, or CPU under the interpreter (or
    CPU and meta tensors while kernel launches are recorded, see fused_inception.codegen)."""
    kind = x.device.type
    return kind == "cuda" or (kconv.INTERPRETING and kind == "cpu") or (kconv.is_recording() and kind in ("cpu", "meta"))


def compute_dtype(x):
    """The autocast dtype when autocast is on for x's device (fp16/bf16) and would cast x
    (autocast leaves float64 alone), else x's dtype."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return x.dtype


def tensor_slots(module):
    """(dict, name) of every parameter and buffer that `module` and its submodules hold now,
    parameters before buffers, module by module; not None, nor a BatchNorm's batch counter
    (`num_batches_tracked`: no plan reads it)."""
    return [(d, name) for m in module.modules() for d in (m._parameters, m._buffers)
            for name, t in d.items() if t is not None and name != "num_batches_tracked"]


def _plain_tensor_scale(recipe, root):
    """[(the holder's __dict__, name)] for a residual scale held as a plain tensor attribute (not
    a buffer: no slot of tensor_slots holds it), else []."""
    scale = recipe.head.scale if recipe.head is not None else None
    if not isinstance(scale, str):
        return []
    path, _, name = scale.rpartition(".")
    holder = root.get_submodule(path)
    if name in holder._buffers or name in holder._parameters or not isinstance(holder.__dict__.get(name), torch.Tensor):
        return []
    return [(holder.__dict__, name)]


class BlockProgram:
    """What a fused block runs: built from its traced recipe over its current submodules.

    Attributes: `graph` (plan.BlockGraph), `id` (for torch.compile's custom ops), and for a
    training forward `train_structure` (the training plan's layout on the meta device),
    `train_refs` ((module, attribute) of each parameter in packing order) and `train_bns`
    ((BatchNorm, first column, last column) per BatchNorm).
    """

    def __init__(self, recipe, module, root=None):
        root = module if root is None else root  # (the module whose forward was traced: its attributes)
        graph = recipe.graph(root)
        check_graph(graph)  # an unfusable block fails here, not at its first forward
        self.recipe = recipe
        self.graph = graph
        self.in_channels = graph.in_channels
        # What a training forward gathers, as plain references (torch.compile traces this; fake
        # implementations read the structure while tracing: real meta tensors).
        with unset_fake_temporarily():
            structure = training.build_train_plan(graph, torch.device("meta"), torch.float32, torch.float32)
        self.train_structure = structure
        self.train_refs = tuple(ref for ref in structure.refs() if ref is not None and getattr(*ref) is not None)
        self.train_bns = tuple(structure.bn_columns)
        # Frozen BatchNorms and norm + act layers with a dropout: see norms.needs_eager.
        self.special_bns = tuple(bn for bn, _, _ in self.train_bns if not norms.is_plain(bn))
        # Every parameter and buffer slot of the block's modules, (dict, names): the plan folds
        # tensors from these and from nothing else, and the stamp reads what they hold at call time.
        grouped = {}
        for d, name in tensor_slots(module) + _plain_tensor_scale(recipe, root):
            grouped.setdefault(id(d), (d, []))[1].append(name)
        self._slots = tuple((d, tuple(names)) for d, names in grouped.values())
        self._plans = {}  # compute dtype -> (stamp, Plan, the stamped tensors)
        self._train_plans = {}
        self._owner = weakref.ref(module)  # the block, for the eval backward's eager recompute (ops.py)
        self.id = next(_ids)
        _BY_ID[self.id] = self

    def held(self):
        """Every parameter and buffer the block's modules hold now (`tensor_slots` order, without
        the BatchNorms' batch counters)."""
        return [d[name] for d, names in self._slots for name in names]

    @staticmethod
    def _stamp(tensors):
        """What the inference plans are derived from, besides the structure (which the block
        watches): which tensor every parameter and buffer slot holds now (`torch.func.functional_call`
        and `torch.utils.swap_tensors` change that; assignment too) and its version, bumped by every
        in-place update (optimizer steps, load_state_dict, running statistics). Tensors made
        under torch.inference_mode have no version counter: no plan is current for them (rebuilt
        on every call). Writes through `.data` need `invalidate_plan()`: no version or identity
        tells them (the data pointer would tell `.data =`, at 1.5 us more per forward)."""
        try:  # (versions only grow: their sum changes when one does, for the same tensors)
            return sum(map(_VERSION, tensors)), tuple(map(_IMPL, tensors))
        except RuntimeError:  # (inference tensors: an object equal to no other stamp)
            return object()

    def plan(self, dtype, device):
        """The inference plan computing in `dtype`, current for the tensors the block holds now."""
        held = self.held()
        stamp = self._stamp(held)
        cached = self._plans.get(dtype)
        if cached is None or cached[0] != stamp:
            # (the stamped tensors are kept: an address in the stamp can't be reused while held)
            cached = self._plans[dtype] = (stamp, build_plan(self.graph, device, dtype), held)
        return cached[1]

    def fresh_plan(self, dtype):
        """The cached inference plan for `dtype` if it is current, else None (the forward's fast
        path: a stale plan is rebuilt on the slow path, after the route is decided)."""
        cached = self._plans.get(dtype)
        try:
            if cached is not None and cached[0] == self._stamp(self.held()):
                return cached[1]
        except (AttributeError, KeyError):  # (a slot emptied or deleted: the slow path sorts it out)
            pass
        return None

    def run(self, x, memory_format=None):
        """The fused eval forward of x (already in the compute dtype): the block output."""
        return self.plan(x.dtype, x.device).run(x, memory_format)

    def forward(self, route, x):
        """The fused forward of x (already in the compute dtype) on `route` (EVAL or TRAIN; in
        training: batch statistics, running-statistics updates, autograd)."""
        if route is not Route.TRAIN:
            return self.run(x)
        plan = self.train_plan(x.dtype, x.device)
        out, _ = training.TrainFunction.apply(plan, self.sync_group(), output_memory_format(x), self.train_bns,
                                              self.running_means(), x, *self.train_params())
        return out

    def route(self, x, training, compiling=False):
        """(Route, reason): how the block computes x now, in `training` mode, under torch.compile
        or export (`compiling`) or not, as far as its graph and tensors decide (the block adds
        what its module state decides: see FusedBlock.eager_reason). The reason, a sentence,
        says why the route is EAGER (None otherwise): wherever the kernels would not compute what
        the eager graph does."""
        reason = self._eager_reason(x, training, compiling)
        if reason is not None:
            return Route.EAGER, reason
        if training:
            return Route.TRAIN, None
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.held())):
            return Route.EVAL_GRAD, None
        return Route.EVAL, None

    def _eager_reason(self, x, training, compiling):
        dtype = compute_dtype(x)
        if not triton_available_for(x):
            return f"no Triton kernel runs on {x.device.type} here (CUDA, or the interpreter: TRITON_INTERPRET=1)"
        if dtype not in KERNEL_DTYPES:
            return f"{dtype} is not a kernel dtype (float32, float16, bfloat16)"
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.graph.head is not None and autocast:
            return "a residual block under autocast adds the fp32 input to a low-precision result"
        for bn, _, _ in self.train_bns:
            if bn.training != training:
                return f"a BatchNorm is in {'train' if bn.training else 'eval'} mode, the block is not"
            if bn.running_mean is None or bn.running_var is None:
                return "a BatchNorm has no running statistics (it normalises with batch statistics)"
            if norms.needs_eager(bn, training):
                return f"{type(bn).__name__} computes more than the kernels do in this mode (frozen, or a dropout)"
        scale = self.residual_scale()
        scale_grad = isinstance(scale, torch.Tensor) and scale.requires_grad
        if training:
            if torch.are_deterministic_algorithms_enabled():
                return "deterministic algorithms are on: the batch statistics are summed with atomics"
            if scale_grad:
                return "the residual scale requires grad (the training kernels treat it as a constant)"
            if len({getattr(*ref).dtype for ref in self.train_refs}) != 1:
                return "the block's parameters have different dtypes"
            if any(not bn.track_running_stats for bn, _, _ in self.train_bns):
                return "a BatchNorm doesn't track running statistics (eager leaves them as they are)"
        elif torch.is_grad_enabled() and (compiling and autocast or scale_grad and not any(
                scale is t for t in self.held())):
            return ("the eval backward would not see the autocast state or the residual scale's gradient "
                    "(compiled under autocast, or a scale from outside the block that requires grad)")
        return None

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
        return self.graph.head.current_scale() if self.graph.head is not None else None

    def train_params(self):
        return [getattr(module, name) for module, name in self.train_refs]

    def running_means(self):
        return [bn.running_mean for bn, _, _ in self.train_bns]

    def sync_group(self):
        """The process group the block's BatchNorm statistics are all-reduced over, or None."""
        return norms.sync_group([bn for bn, _, _ in self.train_bns])

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


def eager_gradients(block, x, tensors, grad, needs):
    """The gradients of the block's eager graph at x (eval), for `grad` of its output: one per
    tensor of [x, *tensors], None where `needs` says not needed (or nothing depends on it).
    `tensors` are what the block's slots (`tensor_slots(block)`) held when the forward ran; they
    are put back there for the recompute (the slots may hold others by now, e.g. after
    `torch.func.functional_call` returned). The fused eval forward's backward, in eager mode
    (blocks._EvalFunction) and under torch.compile / torch.export (ops.block_eval_backward)."""
    leaves = [t.detach().requires_grad_() if need else t for t, need in zip(tensors, needs[1:])]
    with torch.enable_grad(), _holding(block, leaves):
        xd = x.detach().requires_grad_(needs[0])
        y = block.eager_forward(xd)
    wanted = [t for t, need in zip([xd] + leaves, needs) if need]
    grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


@contextlib.contextmanager
def _holding(block, tensors):
    slots = tensor_slots(block)
    if len(slots) != len(tensors):
        raise RuntimeError(f"fused_inception: {type(block).__name__} holds {len(slots)} parameters and buffers, "
                           f"its forward held {len(tensors)} (the block changed between forward and backward)")
    swaps = [(d, name, t) for (d, name), t in zip(slots, tensors) if d[name] is not t]
    olds = [d[name] for d, name, _ in swaps]
    for d, name, t in swaps:
        d[name] = t
    try:
        yield
    finally:
        for (d, name, _), old in zip(swaps, olds):
            d[name] = old
