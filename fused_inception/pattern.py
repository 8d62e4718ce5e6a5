"""Recognise an Inception block by its dataflow (torch.fx), whatever its class or coding style.

The pattern: one input; branches that start from it, optionally through a max/avg pool, as
chains of `Conv2d -> BatchNorm? -> activation?` (BatchNorm: see `norms`, timm's BatchNormAct2d with
its activation included; the activations of `activations`, as modules, functions or the `.relu()`
method, in place or not;
any wrapper modules, timm's ConvNormAct and `nn.Sequential` are traced through),
or a pool alone; a branch may read another branch's result (trees, as Inception v3's split
1x3/3x1 branches); and one `torch.cat(..., dim=1)` (possibly nested) as the block's result, or, for Inception-ResNet,
`act?(x + scale * conv(cat))` in any arrangement of the add and multiply (scale a number or a
buffer, the activation optional as in the last block of the network).

`recipe_of(module)` returns a `Recipe`: the nodes by submodule *name*, so the recipe can be
resolved against the live module each time (`Recipe.graph(module)`) and never holds stale
references. It raises `NotABlock` for a module that doesn't end in a channel concatenation (not
a candidate) and `UnsupportedBlock` with the reason for a candidate that can't be fused.
"""

from dataclasses import dataclass
import functools
from typing import Optional

import operator
import threading

import torch
from torch import fx, nn
import torch.nn.functional as F

from fused_inception import activations, norms
from fused_inception.activations import activation_of_module, combined
from fused_inception.graph import BlockGraph, ConvNode, PoolSpec, ResidualHead, UnsupportedBlock, depths_of
from fused_inception.watch import has_hooks


class NotABlock(Exception):
    """The module is not an Inception-style candidate (its result is not a channel concatenation)."""


class UnsupportedUnit(UnsupportedBlock):
    """`recipe_of(..., allow_single=True)`: the module's result is not a concatenation, and not a
    `pool? -> conv -> BN? -> activation?` chain either (fuse() passes over these silently)."""


@dataclass(frozen=True)
class NodeRecipe:
    conv: Optional[str]  # qualified name of the nn.Conv2d, None for a pool alone
    bn: Optional[str]
    act: object  # the activation after the BatchNorm (besides one inside it): see _activation
    src: Optional[int]
    pool: object  # a PoolSpec (a functional pool), the qualified name of a pool module, or None


@dataclass(frozen=True)
class HeadRecipe:
    conv: str
    scale: object  # a number, or the qualified name (str) of a one-element buffer
    act: object  # as NodeRecipe.act
    shortcut: Optional[str] = None  # a projection shortcut's conv (None: x itself)
    bn: Optional[str] = None  # a BatchNorm after the add


@dataclass(frozen=True)
class Recipe:
    nodes: tuple
    outputs: tuple
    eager_kernels: int  # kernel-launching operations of the traced forward (conv, BN, activation, pool, cat, ...)
    head: Optional[HeadRecipe] = None
    single: bool = False  # the result is one chain (a conv unit), not a concatenation

    def graph(self, module):
        """The BlockGraph of `module`'s current submodules."""
        nodes = []
        for r in self.nodes:
            bn = module.get_submodule(r.bn) if r.bn else None
            nodes.append(ConvNode(module.get_submodule(r.conv) if r.conv else None, bn, _activation(module, r.act, bn),
                                  r.src, PoolSpec.from_module(module.get_submodule(r.pool)) if isinstance(r.pool, str)
                                  else r.pool))
        readers = [n.conv for n in nodes if n.src is None and n.conv is not None]
        if not readers:
            raise UnsupportedBlock("no convolution reads the block input")
        head = None
        if self.head is not None:
            scale = self.head.scale
            if isinstance(scale, str):  # a buffer: read where it is when used (functional_call swaps it)
                scale = functools.partial(_attribute, module, scale)
            h = self.head
            bn = module.get_submodule(h.bn) if h.bn else None
            head = ResidualHead(module.get_submodule(h.conv), scale, _activation(module, h.act, bn),
                                module.get_submodule(h.shortcut) if h.shortcut else None, bn)
        return BlockGraph(nodes, list(self.outputs), readers[0].in_channels, head)

    @property
    def launches(self):
        return max(depths_of(self.nodes)) + (self.head is not None)


def _activation(module, act, bn):
    """The Activation of a node: `act` (an Activation, the qualified name of an activation module,
    resolved with its current attributes, or None) after the one a norm + act layer `bn` applies."""
    if isinstance(act, str):
        act = activation_of_module(module.get_submodule(act))
        if act is None:
            raise UnsupportedBlock("an activation module was replaced by one the kernels don't compute")
    one = combined(norms.activation_of(bn)[0] if bn is not None else None, act)
    if one is False:
        raise UnsupportedBlock(f"two activations in a row ({norms.activation_of(bn)[0]} then {act})")
    return one


def _attribute(module, qualname):
    *path, name = qualname.split(".")
    return getattr(module.get_submodule(".".join(path)), name)


class _Tracer(fx.Tracer):
    """Traces through user modules; torch.nn layers, fused blocks and BatchNorm layers that
    `norms` interprets (timm's BatchNormAct2d, frozen BatchNorms) stay leaves."""

    def is_leaf_module(self, m, qualname):
        # (a module with hooks too: tracing through it would call them with fx proxies)
        return is_layer(m) or has_hooks(m)


def is_layer(module):
    """True for a module torch.fx keeps whole (torch.nn layers, fused blocks, the BatchNorms `norms`
    interprets): neither a block nor a conv unit, nothing to find inside."""
    torch_nn = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))  # (fx's default leaves)
    return (getattr(module, "_is_fused_block", False) or norms.is_leaf(module)
            or torch_nn and not isinstance(module, nn.Sequential))


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _describe(n):
    return f"{n.op} {getattr(n.target, '__name__', n.target)}"


class _Parser:
    def __init__(self, module, graph):
        self.module = module
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise NotABlock(f"forward takes {len(inputs)} inputs")
        self.x = inputs[0]
        self.nodes, self.memo, self.absorbed = [], {}, set()
        self.extra_kernels = 0  # kernels inside interpreted leaves (a norm + act layer's activation)

    def submodule(self, n):
        return self.module.get_submodule(n.target) if n.op == "call_module" else None

    def activation(self, n):
        """(activation, in place?) if fx node n is an activation the kernels compute, else None:
        the activation a module's qualified name (resolved when the graph is built: its
        attributes may change), an activations.Activation for a function or method call, or
        None for nn.Identity."""
        if n.op == "call_module":
            m = self.submodule(n)
            if type(m) is nn.Identity:  # (timm's act_layer=None, a user's placeholder): none
                return None, False
            if activations.activation_of_module(m) is None:
                return None
            return n.target, bool(getattr(m, "inplace", False))
        if n.op == "call_method" and n.target in ("relu", "relu_") and len(n.args) == 1:
            return activations.RELU, n.target == "relu_"
        if n.op == "call_function":
            return activations.activation_of_call(n.target, n.args[1:], n.kwargs)
        return None

    def pool_of(self, n):
        """PoolSpec of a pooling node (for a pool module: its qualified name, resolved with the
        module's current attributes by Recipe.graph), or None if n is not one."""
        m = self.submodule(n)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            PoolSpec.from_module(m)  # (raises UnsupportedBlock now for a pool the kernel can't compute)
            return n.target
        if n.op == "call_function" and n.target in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
            names = _AVG_POOL_ARGS if n.target is F.avg_pool2d else _MAX_POOL_ARGS
            kwargs = dict(zip(names, n.args[1:]), **n.kwargs)
            return PoolSpec.make("avg" if n.target is F.avg_pool2d else "max", **kwargs)
        return None

    def parse(self, v):
        """Index of the node computing fx value v (a branch result), parsing its chain back to the input."""
        if v in self.memo:
            return self.memo[v]
        if not isinstance(v, fx.Node):
            raise UnsupportedBlock(f"a concatenated value is a constant ({v!r})")
        act, bn, cur = None, None, v
        found = self.activation(cur)
        if found is not None:
            if found[1] and len(cur.args[0].users) > 1:
                raise UnsupportedBlock("an in-place activation changes a value that is also used elsewhere")
            act, cur = found[0], self._absorb(cur)
        if norms.is_batchnorm(self.submodule(cur)):
            reason = norms.activation_of(self.submodule(cur))[1]
            if reason is not None:
                raise UnsupportedBlock(f"{cur.target}: {reason}")
            _activation(self.module, act, self.submodule(cur))  # (raises for two activations in a row)
            self.extra_kernels += norms.eager_ops(self.submodule(cur)) - 1
            bn, cur = cur.target, self._absorb(cur)
        conv = pool = None
        if isinstance(self.submodule(cur), nn.Conv2d):
            conv, src_v = cur.target, self._absorb(cur)
            pool = self.pool_of(src_v) if isinstance(src_v, fx.Node) else None
            if pool is not None:
                src_v = self._absorb(src_v)
                if src_v is not self.x:
                    raise UnsupportedBlock("a pool inside a branch (only a pool on the block input fuses)")
        elif act is None and bn is None and self.pool_of(cur) is not None:
            pool, src_v = self.pool_of(cur), self._absorb(cur)  # a pool-only branch
            if src_v is not self.x:
                raise UnsupportedBlock("a pool-only branch that doesn't read the block input")
        else:
            what = _describe(cur) if isinstance(cur, fx.Node) else repr(cur)
            if isinstance(cur, fx.Node) and cur.op == "call_module":
                what += f" ({type(self.submodule(cur)).__name__})"
            raise UnsupportedBlock(f"a branch is computed by {what}, not Conv2d/BatchNorm2d/activation/pool")
        if not isinstance(src_v, fx.Node):
            raise UnsupportedBlock(f"a layer reads a constant ({src_v!r})")
        src = None if src_v is self.x else self.parse(src_v)
        self.nodes.append(NodeRecipe(conv, bn, act, src, pool))
        self.memo[v] = len(self.nodes) - 1
        return self.memo[v]

    def _absorb(self, n):
        """Mark n as part of the pattern; return its (single tensor) input."""
        self.absorbed.add(n)
        if len(n.args) < 1 or not isinstance(n.args[0], fx.Node):
            raise UnsupportedBlock(f"{_describe(n)} has no tensor input")
        return n.args[0]


def _cat_inputs(n, cats):
    """Flatten torch.cat(..., dim=1) (nested ones too) into the list of concatenated values."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.cat:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if dim in (1, -3) and isinstance(tensors, (list, tuple)):
            cats.add(n)
            out = []
            for t in tensors:
                inner = _cat_inputs(t, cats) if isinstance(t, fx.Node) and len(t.users) == 1 else None
                out.extend(inner if inner is not None else [t])
            return out
    return None


# torch.fx patches nn.Module.__call__ for the whole process while it traces, and two traces that
# overlap can restore each other's patch: traces are serialised. (Forwards never trace: a block
# is recognised when built or fused, and again only when its structure changes, see watch.py.)
_TRACING = threading.Lock()


def recipe_of(module, method="forward", allow_single=False):
    """Trace module.<method> and return its Recipe (see the module docstring for what matches).

    allow_single: also accept a single chain as the result (a conv unit), not only a concatenation;
    a single result that is no such chain raises UnsupportedUnit (an UnsupportedBlock).
    """
    tracer = _Tracer()
    tracer.traced_func_name = method
    try:
        with _TRACING:
            graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - untraceable (control flow on values, ...) = not a candidate
        raise NotABlock(f"not traceable by torch.fx: {type(e).__name__}") from e
    parser = _Parser(module, graph)
    (output,) = [n for n in graph.nodes if n.op == "output"]
    cats = set()
    result, head = output.args[0], None
    values = _cat_inputs(result, cats)
    if values is None and isinstance(result, fx.Node):
        head, cat = _residual_head(parser, result)
        if head is not None:
            values = _cat_inputs(cat, cats)
            if values is None:
                raise UnsupportedBlock("the residual head's conv does not read a channel concatenation")
    single = values is None and allow_single and isinstance(result, fx.Node)
    if single:
        values = [result]
    if values is None:
        raise NotABlock("its result is not a torch.cat along channels")
    try:
        outputs = tuple(parser.parse(v) for v in values)
        for n in graph.nodes:
            if n.op in ("call_module", "call_function", "call_method", "get_attr") and n not in parser.absorbed \
                    and n not in cats:
                raise UnsupportedBlock(f"it computes {_describe(n)} outside the Inception pattern")
        for i, r in enumerate(parser.nodes):
            uses = sum(o == i for o in outputs) + sum(s.src == i for s in parser.nodes)
            if uses == 0:
                raise UnsupportedBlock(f"branch node {i} is computed but not used")
    except UnsupportedBlock as e:
        if single:
            raise UnsupportedUnit(str(e)) from e
        raise
    return Recipe(tuple(parser.nodes), outputs, len(parser.absorbed) + len(cats) + parser.extra_kernels, head, single)


_ADD = {operator.add, torch.add}
_MUL = {operator.mul, torch.mul}


def _residual_head(parser, result):
    """(HeadRecipe, the fx value the head conv reads) for act?(bn?(shortcut + scale * conv(v))),
    shortcut being x itself or a conv of x (a projection), in any arrangement of the add and the
    multiply; else (None, None).

    Nodes are only absorbed once the whole shape has matched; a non-match leaves no trace."""
    taken, act, bn, cur = [], None, None, result
    found = parser.activation(cur)
    if found is not None:
        act = found[0]
        taken.append(cur)
        cur = cur.args[0]
    m = parser.submodule(cur) if isinstance(cur, fx.Node) else None
    if m is not None and norms.is_batchnorm(m):
        inner, reason = norms.activation_of(m)
        if reason is not None or (inner is not None and act is not None):
            return None, None
        bn = cur.target
        taken.append(cur)
        cur = cur.args[0]
    is_add = isinstance(cur, fx.Node) and ((cur.op == "call_function" and cur.target in _ADD)
                                           or (cur.op == "call_method" and cur.target == "add"))
    if not is_add or len(cur.args) != 2 or cur.kwargs:
        return None, None
    for a, b in (cur.args, cur.args[::-1]):
        shortcut = _shortcut(parser, a)
        up_term = _up_term(parser, b) if shortcut is not False else None
        if up_term is not None:
            break
    else:
        return None, None
    scale, up, up_taken = up_term
    taken += [cur, *up_taken]
    if shortcut is not None:
        taken.append(a)
    parser.absorbed.update(taken)
    return HeadRecipe(up.target, scale, act, shortcut, bn), up.args[0]


def _shortcut(parser, v):
    """None for x itself, the qualified name of a Conv2d that reads x, else False."""
    if v is parser.x:
        return None
    if isinstance(v, fx.Node) and isinstance(parser.submodule(v), nn.Conv2d) and len(v.args) == 1 \
            and v.args[0] is parser.x and len(v.users) == 1:
        return v.target
    return False


def _up_term(parser, b):
    """(scale, the up-projection's conv node, nodes taken) for scale * conv(v), conv(v) * scale or
    conv(v); None otherwise."""
    if not isinstance(b, fx.Node):
        return None
    taken, scale, up = [], 1.0, b
    if b.op == "call_function" and b.target in _MUL or (b.op == "call_method" and b.target == "mul"):
        u, v = b.args
        if isinstance(u, fx.Node) and u.op == "call_module":
            up, scale = u, v
        else:
            up, scale = v, u
        taken.append(b)
        if isinstance(scale, fx.Node):
            if scale.op != "get_attr":
                return None
            taken.append(scale)
            scale = scale.target
        elif not isinstance(scale, (int, float)):
            return None
    if not (isinstance(up, fx.Node) and isinstance(parser.submodule(up), nn.Conv2d)):
        return None
    taken.append(up)
    return scale, up, taken
