"""What a fused block's program was built from, and a cheap test that it still holds.

A `FusedBlock` recognises its graph once (torch.fx, `pattern.recipe_of`) when it is built or
fused. Users may change a block afterwards in many ways; each is seen here and sorted by what it
needs (`Watch.diff`):

- `retrace`: a submodule of another name or class, a plain attribute of a module the trace went
  through (e.g. a residual scale held as a Python float, a `no_relu` flag): the recipe may differ,
  so the block is traced again (serialised: `pattern.recipe_of` holds a lock);
- `rebuild`: a submodule replaced by another of the same class, a geometry attribute changed (a
  conv's stride, a BatchNorm's eps or `track_running_stats`, a pool's size): same recipe, a new
  program over the current submodules;
- nothing: train/eval flags (read by the route on every call, never a reason to trace).

Hooks (forward, pre-forward, backward, on any inner module, or registered globally for all
modules) and parametrizations (`torch.nn.utils.parametrize`, `weight_norm`) make the block run
its eager graph while they exist: the fused kernels can't call them. Pruning
(`torch.nn.utils.prune`) is a forward pre-hook and is seen as one.

Tensor values are not watched here: `program.BlockProgram._stamp` reads the tensors the module
holds at call time (identity and version).
"""

import functools
import operator

from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from fused_inception import norms

# Bumped whenever any module anywhere registers a submodule, parameter or buffer (assignment
# included), so that a block knows when to look at its submodules' identities again.
_generation = [0]


def _count_registration(module, name, value):
    _generation[0] += 1


_module.register_module_module_registration_hook(_count_registration)
_module.register_module_parameter_registration_hook(_count_registration)
_module.register_module_buffer_registration_hook(_count_registration)

# Attributes of torch.nn layers that a program is built from (a change: rebuild).
_GEOMETRY = {
    nn.Conv2d: ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.BatchNorm2d: ("eps", "affine", "track_running_stats"),
    nn.SyncBatchNorm: ("eps", "affine", "track_running_stats", "process_group"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.LeakyReLU: ("negative_slope",),
    nn.GELU: ("approximate",),
}
_PLAIN = (bool, int, float, str, tuple, type(None))

# Per-module hook dictionaries, and what to call them in a reason.
_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOKS = (_module._global_forward_pre_hooks, _module._global_forward_hooks,
                 _module._global_backward_pre_hooks, _module._global_backward_hooks)


@functools.lru_cache(maxsize=None)
def _geometry_names(cls):
    """_GEOMETRY's entry for cls or its nearest base there (timm's BatchNormAct2d is a
    BatchNorm2d), or a frozen BatchNorm's eps."""
    for base in cls.__mro__:
        if base in _GEOMETRY:
            return _GEOMETRY[base]
    return ("eps",) if norms.is_frozen_type(cls) else ()


def has_hooks(m):
    """True if module m itself has a forward, pre-forward or backward hook."""
    return any(getattr(m, attr) for attr, _ in _HOOKS)


def _hook_name(hook):
    return getattr(hook, "__qualname__", None) or type(hook).__name__


class Watch:
    """A snapshot of a fused block's inner modules (`named`: (qualified name, module), the block
    itself excluded) and of what its program was built from.

    `unchanged()` is the forward's fast test (a few microseconds), `current()` the slow path's;
    `diff()` says what changed.
    `reason` is why the block must run eagerly whatever the input (hooks, parametrizations), or
    None.
    """

    def __init__(self, block, root):
        modules = [m for m in block.modules() if m is not block]
        self.named = [(name, m) for name, m in block.named_modules() if m is not block]
        self.generation = _generation[0]
        self.shape = tuple((name, type(m)) for name, m in self.named)
        self.ids = tuple(map(id, modules))
        # Which parameters and buffers are set (a conv bias added or removed changes the plans).
        self.slots = tuple(tuple(name for d in (m._parameters, m._buffers) for name, t in d.items() if t is not None)
                           for m in modules)
        # What the program was built from: geometry (a change: rebuild) and the plain attributes
        # of the modules the trace went through, the root included (a change: retrace).
        self.geometry = [(m, operator.attrgetter(*_geometry_names(type(m)))) for m in modules
                         if _geometry_names(type(m))]
        self.code = []
        for m in {id(m): m for m in [root, *modules] if not _geometry_names(type(m))}.values():
            plain = sorted(k for k, v in m.__dict__.items() if type(v) in _PLAIN and k[0] != "_" and k != "training")
            if plain:
                self.code.append((m, operator.attrgetter(*plain)))
        # The forward's fast test reads all of it, and the train/eval flags that the route reads
        # (the block's and its BatchNorms'), in one pass: one getter per module.
        fast = [(m, operator.attrgetter(*_geometry_names(type(m)), *(("training",) if norms.is_batchnorm(m) else ())))
                for m, _ in self.geometry]
        fast += [(block, operator.attrgetter("training"))] + self.code
        self.objects = tuple(m for m, _ in fast)
        self.getters = tuple(get for _, get in fast)
        self.values = self.read()
        self.code_values, self.geometry_values = _read(self.code), _read(self.geometry)
        self.hooks = tuple(getattr(m, attr) for m in modules for attr, _ in _HOOKS) + _GLOBAL_HOOKS
        # Deleting a submodule, parameter or buffer (`del`, Sequential.pop) registers nothing:
        # the dictionaries' sizes tell. (The forward's fast test counts submodules only: a
        # deleted parameter or buffer already fails the plan's stamp.)
        self.containers = tuple(m._modules for m in [block, *modules] if m._modules)
        self.dicts = self.containers + tuple(d for m in modules for d in (m._parameters, m._buffers) if d)
        self.modules_size, self.size = sum(map(len, self.containers)), sum(map(len, self.dicts))
        self.reason = self._reason()

    def read(self):
        return list(map(operator.call, self.getters, self.objects))

    def unchanged(self):
        """The forward's fast test: nothing registered anywhere, no watched attribute changed, no
        submodule deleted, no hook."""
        return (self.generation == _generation[0] and self.read() == self.values
                and sum(map(len, self.containers)) == self.modules_size and not any(self.hooks))

    def current(self):
        """True if nothing that the program was built from can have changed since this snapshot."""
        return (self.generation == _generation[0] and self.read() == self.values
                and sum(map(len, self.dicts)) == self.size)

    def hooks_reason(self):
        """Why hooks make the block run eagerly, naming the first one; None without hooks."""
        if not any(self.hooks):
            return None
        for name, m in self.named:
            for attr, what in _HOOKS:
                for hook in getattr(m, attr).values():
                    return f"{name} has a {what} ({_hook_name(hook)}): the eager graph runs so that it is called"
        return "a global module hook is registered (torch.nn.modules.module): the eager graph runs so that it is called"

    def _reason(self):
        for name, m in self.named:
            if parametrize.is_parametrized(m):
                return f"{name} is parametrized (torch.nn.utils.parametrize): the eager graph computes its weights"
        return None

    def diff(self, block, root):
        """(change, new snapshot): what changed since this one, None, "retrace" or "rebuild" (see
        the module docstring)."""
        new = Watch(block, root)
        if new.shape != self.shape or new.code_values != self.code_values:
            return "retrace", new
        if new.ids != self.ids or new.slots != self.slots or new.geometry_values != self.geometry_values:
            return "rebuild", new
        return None, new


def _read(pairs):
    return [get(m) for m, get in pairs]
