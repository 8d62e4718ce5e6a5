"""fuse(model): swap fused blocks into any Inception-style network, found by dataflow.

Every submodule is traced with torch.fx (`pattern.recipe_of`), outermost first; one whose result
is a channel concatenation of conv/BN/activation/pool branches (a block), or one `pool? -> conv ->
BN? -> activation?` chain (a conv unit: torchvision's BasicConv2d, timm's ConvNormAct, an
`nn.Sequential(conv, bn, relu)`), is replaced by a `FusedGraphBlock` holding the same submodules
and parameter objects, and fuse() does not look inside it. Block candidates that can't be fused
are left as they are and the report says why; the search goes on inside them (their conv units
are still swapped, each one exactly what it was). Modules that are no candidate are searched
inside too.

Conv units are opportunistic: one that doesn't fuse (a depthwise conv, an ELU, ...) or would
save nothing (a conv alone: one kernel either way) is passed over without a report line, as every
convolution of a network would otherwise be listed.
"""

import copy
from dataclasses import dataclass, field

from torch import nn

from fused_inception.blocks import FusedBlock, FusedGraphBlock
from fused_inception.pattern import NotABlock, UnsupportedUnit, is_layer, recipe_of
from fused_inception.graph import UnsupportedBlock, check_graph
from fused_inception.watch import Watch


@dataclass
class FuseReport:
    """What fuse() did: blocks and conv units swapped (name, class, eager kernels, fused launches),
    the names of the conv units among them, and block candidates left alone (name, class, reason)."""

    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    units: set = field(default_factory=set)

    def __str__(self):
        lines = self._header()
        for name, cls, before, after in self.swapped:
            kind = ", conv unit" if name in self.units else ""
            lines.append(f"  swapped     {name or '<root>'} ({cls}{kind}): {before} -> {after} launches")
        return "\n".join(lines + self._left_alone_lines())

    def summary(self):
        """The counts and the candidates left alone with their reasons (no line per swapped block)."""
        return "\n".join(self._header() + self._left_alone_lines())

    def _header(self):
        blocks = len(self.swapped) - len(self.units)
        return [f"fuse(): {blocks} block(s) and {len(self.units)} conv unit(s) swapped, "
                f"{len(self.left_alone)} candidate(s) left alone"]

    def _left_alone_lines(self):
        return [f"  left alone  {name or '<root>'} ({cls}): {reason}" for name, cls, reason in self.left_alone]


def _fused_or_reason(module):
    """A FusedGraphBlock for module (a block, or a conv unit worth fusing), the reason a block
    candidate can't be fused, or None if it is no candidate."""
    if is_layer(module) or not any(True for _ in module.parameters()):
        return None  # torch.nn layers, fused blocks, parameter-free modules
    watch = Watch(module, module)  # hooks or parametrizations inside: the kernels can't honour them
    reason = watch.reason or watch.hooks_reason()
    # A Sequential is a container (blocks are found inside it) unless it is one conv unit.
    container, recipe = isinstance(module, nn.Sequential), None
    try:
        recipe = recipe_of(module, allow_single=True)
        if recipe.single and recipe.eager_kernels <= recipe.launches:
            return None  # a lone conv: fusing it saves nothing
        if container and not recipe.single:
            return None
        if reason is not None:
            return None if recipe.single else reason
        fused = FusedGraphBlock(module, recipe)
        check_graph(fused.graph())
    except (NotABlock, UnsupportedUnit):
        return None
    except UnsupportedBlock as e:
        if container or recipe is not None and recipe.single:
            return None
        return str(e)
    return fused


def fuse(model, inplace=True):
    """Replace every Inception-style block of `model` by a fused module; returns (model, report).

    A block is recognised by its dataflow, not its class: one input; branches of
    Conv2d -> BatchNorm? -> activation? chains (any wrapper modules, nn.Sequential; ReLU, ReLU6,
    LeakyReLU, SiLU, GELU or Hardswish as modules or functions, in place or not; conv bias on or
    off, any BN eps; BatchNorm2d, SyncBatchNorm, timm's BatchNormAct2d, frozen BatchNorms: see `norms`) starting from the input
    or from a max/avg pool of it, possibly reading each other (trees), or a pool alone; ending in
    one torch.cat(..., dim=1) in any branch order, or in Inception-ResNet's act?(x + scale *
    conv(cat)). A conv unit (one such chain as a module's whole result, e.g. a stem's
    BasicConv2d / ConvNormAct) is swapped too. The fused module shares the original's
    submodules and parameters, so state_dict keys, load_state_dict and optimizers built before
    fuse() keep working. Already fused blocks are skipped (fuse is idempotent).

    Args:
        model: any nn.Module.
        inplace: modify `model` (default) or a deep copy of it.

    Example:
        >>> model, report = fuse(torchvision.models.googlenet(weights=None, init_weights=True).eval())
        >>> print(report)   # swapped inception3a (Inception): 20 -> 2 launches ...
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    done = {}  # id -> what a module became: one registered under two names is fused once, under both

    def visit(module, name):
        if id(module) not in done:
            done[id(module)] = _visit(module, name)
        return done[id(module)]

    def _visit(module, name):
        result = _fused_or_reason(module)
        if isinstance(result, FusedGraphBlock):
            report.swapped.append((name, type(module).__name__, result._recipe.eager_kernels, result.launches))
            if result._recipe.single:
                report.units.add(name)
            return result
        if isinstance(result, str):
            report.left_alone.append((name, type(module).__name__, result))
        if not isinstance(module, FusedBlock):
            for child_name, child in list(module._modules.items()):  # (every name, unlike named_children)
                if child is None:
                    continue
                new = visit(child, f"{name}.{child_name}" if name else child_name)
                if new is not child:
                    setattr(module, child_name, new)
        return module

    return visit(model, ""), report
