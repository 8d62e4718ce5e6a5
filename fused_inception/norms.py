"""Which modules the stage kernel computes as a BatchNorm: torch's, timm's norm + activation layers, frozen ones.

Recognised by structure, without importing timm or torchvision:

- plain: `nn.BatchNorm2d`, `nn.SyncBatchNorm` (exactly these classes; a user's subclass with its own
  forward is traced through like any module).
- norm + act: a `BatchNorm2d`/`SyncBatchNorm` subclass whose only children are `drop` and `act`, as
  timm's `BatchNormAct2d` and `SyncBatchNormAct` (forward: batch norm, then `drop`, then `act`).
  `act` must be an activation the kernels compute (`activations`: ReLU, ReLU6, LeakyReLU, SiLU,
  GELU, Hardswish) or `nn.Identity` (timm's `apply_act=False`); `drop` `nn.Identity`, or a
  torch dropout layer (identity in eval: such a block runs eager in training).
- frozen: a parameter-free module named `*FrozenBatchNorm*` with buffers `weight`, `bias`,
  `running_mean`, `running_var` and a float `eps` (torchvision's `FrozenBatchNorm2d`, timm's
  `FrozenBatchNormAct2d` with `drop`/`act` children as above): an eval-mode BatchNorm always, so
  folded like one; in training its block runs eager (the training kernels use batch statistics).

The norm + act and frozen layers are torch.fx leaves (`pattern._Tracer`): they are interpreted
here, not traced through.

Example:
    >>> norms.is_batchnorm(timm.layers.BatchNormAct2d(8))
    True
    >>> norms.activation_of(timm.layers.BatchNormAct2d(8, apply_act=False))
    (None, None)
"""

from functools import lru_cache

import torch
from torch import nn

from fused_inception.activations import activation_of_module

_PLAIN = (nn.BatchNorm2d, nn.SyncBatchNorm)
_FROZEN_BUFFERS = frozenset(("weight", "bias", "running_mean", "running_var"))
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _children(m):
    return set(m._modules)


def is_plain(m):
    """torch's own BatchNorm2d / SyncBatchNorm (not a subclass)."""
    return type(m) in _PLAIN


def is_norm_act(m):
    """timm's BatchNormAct2d / SyncBatchNormAct: a BatchNorm subclass with `drop` and `act` children."""
    return isinstance(m, _PLAIN) and type(m) not in _PLAIN and _children(m) == {"drop", "act"}


@lru_cache(maxsize=None)
def is_frozen_type(cls):
    """A class named like torchvision's/timm's frozen BatchNorms (the structure is checked by is_frozen)."""
    return "FrozenBatchNorm" in cls.__name__


def is_frozen(m):
    """torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d: buffers only, eval semantics always."""
    return (is_frozen_type(type(m)) and not any(p is not None for p in m._parameters.values())
            and _FROZEN_BUFFERS <= set(m._buffers) and isinstance(getattr(m, "eps", None), float)
            and _children(m) in (set(), {"drop", "act"}))


def is_batchnorm(m):
    """True for a module the stage kernel folds as a BatchNorm (plain, norm + act, frozen)."""
    return is_plain(m) or is_norm_act(m) or is_frozen(m)


def is_leaf(m):
    """Layers that torch.fx must not trace through: their forward is interpreted by `activation_of`."""
    return is_norm_act(m) or is_frozen(m)


def activation_of(m):
    """(activation, reason) for a BatchNorm layer: the activations.Activation the layer itself
    ends with (None: none); reason says why the kernels can't compute it (None when they can)."""
    act, drop = m._modules.get("act"), m._modules.get("drop")
    if drop is not None and type(drop) is not nn.Identity and not isinstance(drop, _DROPOUTS):
        return None, f"its drop layer is {type(drop).__name__}, not nn.Identity or a dropout"
    if act is None or type(act) is nn.Identity:
        return None, None
    activation = activation_of_module(act)
    if activation is None:
        return None, f"its activation is {type(act).__name__}, not one the kernels compute"
    return activation, None


def applies_act(m):
    """True when BatchNorm layer m applies an activation itself (a norm + act layer's `act`)."""
    return m is not None and activation_of(m)[0] is not None


def eager_ops(m):
    """Kernel-launching operations of the layer's own forward (batch norm, dropout, activation)."""
    extra = [m._modules.get(name) for name in ("drop", "act")]
    return 1 + sum(c is not None and type(c) is not nn.Identity for c in extra)


def num_features(bn):
    return bn.num_features if isinstance(bn, _PLAIN) else bn.running_mean.numel()


def unsupported_reason(bn):
    """Why the kernels can't fold `bn` (None when they can)."""
    if not is_batchnorm(bn):
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d or nn.SyncBatchNorm"
    reason = activation_of(bn)[1]
    if reason is not None:
        return f"{type(bn).__name__}: {reason}"
    if isinstance(bn, _PLAIN) and not bn.track_running_stats:
        return "BatchNorm without running stats normalises with batch statistics"
    return None


def needs_eager(bn, training):
    """True when the kernels of a block in `training` mode would not compute what `bn` does: a
    frozen BatchNorm in training (always running statistics), or a dropout `drop` that is active."""
    if training and is_frozen(bn):
        return True
    drop = bn._modules.get("drop")
    return drop is not None and type(drop) is not nn.Identity and (training or drop.training)


# ---------------------------------------------------------------------------------------------
# In training: SyncBatchNorm's process group and the running statistics (training.py)


def sync_group(bns):
    """The process group whose statistics a block's BatchNorms share (SyncBatchNorm in a
    distributed run of more than one process), or None."""
    kinds = {isinstance(bn, nn.SyncBatchNorm) for bn in bns}  # (timm's SyncBatchNormAct is one)
    if True not in kinds:
        return None
    import torch.distributed as dist

    from fused_inception.graph import UnsupportedBlock

    if not (dist.is_available() and dist.is_initialized()):
        return None  # SyncBatchNorm computes as BatchNorm2d
    if len(kinds) > 1:
        raise UnsupportedBlock("the block mixes SyncBatchNorm and BatchNorm2d: convert all of its BatchNorms "
                               "(nn.SyncBatchNorm.convert_sync_batchnorm) or none")
    groups = {id(bn.process_group): bn.process_group for bn in bns}
    if len(groups) > 1:
        raise UnsupportedBlock("the block's SyncBatchNorms use different process groups")
    group = next(iter(groups.values())) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce(t, group):
    import torch.distributed as dist

    dist.all_reduce(t, group=group)


def update_running_stats(bns, saved):
    """nn.BatchNorm2d's update of running_mean / running_var / num_batches_tracked from a training
    forward's `saved` statistics (mean, 1/std, unbiased variance, count per column).

    bns: (BatchNorm module, first column, last column) per BatchNorm of the block."""
    with torch.no_grad():
        counters = [bn.num_batches_tracked for bn, _, _ in bns if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        by_momentum = {}
        for bn, lo, hi in bns:
            mean, var = saved[0, lo:hi].to(bn.running_mean.dtype), saved[2, lo:hi].to(bn.running_var.dtype)
            if bn.momentum is None:  # cumulative moving average: weight 1 / num_batches_tracked
                weight = torch.reciprocal(bn.num_batches_tracked.to(bn.running_mean.dtype))
                bn.running_mean.lerp_(mean, weight)
                bn.running_var.lerp_(var, weight)
            else:
                selves, ends = by_momentum.setdefault(bn.momentum, ([], []))
                selves += [bn.running_mean, bn.running_var]
                ends += [mean, var]
        for momentum, (selves, ends) in by_momentum.items():
            torch._foreach_lerp_(selves, ends, momentum)
