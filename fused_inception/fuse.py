"""fuse(model): swap fused blocks into any Inception-style network, found by dataflow.

Every submodule is traced with torch.fx (`pattern.recipe_of`); one whose result is a channel
concatenation of conv/BN/ReLU/pool branches is replaced by a `FusedGraphBlock` holding the same
submodules and parameter objects. Candidates that can't be fused are left as they are and the
report says why; modules that are not candidates are searched for blocks inside them.
"""

import copy
from dataclasses import dataclass, field

from torch import nn

from fused_inception.blocks import FusedBlock, FusedGraphBlock
from fused_inception.pattern import NotABlock, recipe_of
from fused_inception.plan import UnsupportedBlock, check_graph


@dataclass
class FuseReport:
    """What fuse() did: blocks swapped (name, class, eager kernels, fused launches) and candidates
    left alone (name, class, reason)."""

    swapped: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fuse(): {len(self.swapped)} block(s) swapped, {len(self.left_alone)} candidate(s) left alone"]
        for name, cls, before, after in self.swapped:
            lines.append(f"  swapped     {name or '<root>'} ({cls}): {before} -> {after} launches")
        for name, cls, reason in self.left_alone:
            lines.append(f"  left alone  {name or '<root>'} ({cls}): {reason}")
        return "\n".join(lines)


def _fused_or_reason(module):
    """A FusedGraphBlock for module, the reason it can't be fused, or None if it is no candidate."""
    if isinstance(module, (FusedBlock, nn.Sequential)) or not any(True for _ in module.parameters()):
        return None  # containers: the block is found inside them
    try:
        recipe = recipe_of(module)
        fused = FusedGraphBlock(module, recipe)
        check_graph(fused.graph())
    except NotABlock:
        return None
    except UnsupportedBlock as e:
        return str(e)
    return fused


def fuse(model, inplace=True):
    """Replace every Inception-style block of `model` by a fused module; returns (model, report).

    A block is recognised by its dataflow, not its class: one input; branches of
    Conv2d -> BatchNorm2d? -> ReLU? chains (any wrapper modules, nn.Sequential, F.relu /
    torch.relu / nn.ReLU, in place or not, conv bias on or off, any BN eps) starting from the input
    or from a max/avg pool of it, possibly reading each other (trees), or a pool alone; ending in
    one torch.cat(..., dim=1) in any branch order. The fused block shares the original's
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

    def visit(module, name):
        result = _fused_or_reason(module)
        if isinstance(result, FusedGraphBlock):
            report.swapped.append((name, type(module).__name__, result._recipe.eager_kernels, result.launches))
            return result
        if isinstance(result, str):
            report.left_alone.append((name, type(module).__name__, result))
        if not isinstance(module, FusedBlock):
            for child_name, child in list(module.named_children()):
                new = visit(child, f"{name}.{child_name}" if name else child_name)
                if new is not child:
                    setattr(module, child_name, new)
        return module

    return visit(model, ""), report
