"""Counting kernel launches: the report and the tests read the counter kept by the kernel launcher."""

import contextlib

from torch.utils._python_dispatch import TorchDispatchMode

from fused_inception.kernels import conv as kconv


class LaunchCount:
    """Launches of fused kernels since the `count_launches()` block started (live while inside it)."""

    def __init__(self):
        self._start = kconv.launch_count()
        self._end = None

    @property
    def value(self):
        return (self._end if self._end is not None else kconv.launch_count()) - self._start

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"LaunchCount({self.value})"


@contextlib.contextmanager
def count_launches():
    """Count the Triton kernel launches made inside the block.

    Example:
        >>> with fused_inception.count_launches() as n:
        ...     block(x)
        >>> n.value
        2
    """
    count = LaunchCount()
    try:
        yield count
    finally:
        count._end = kconv.launch_count()


class _TorchKernelCounter(TorchDispatchMode):
    """Counts the ATen operators that launch a kernel: views and allocations don't."""

    _FREE = {"empty", "empty_strided", "empty_like", "detach", "t", "alias", "lift_fresh", "_to_copy_meta",
             "_unsafe_view"}

    def __init__(self):
        super().__init__()
        self.names = []
        self.paused = False  # set while the caller's own bookkeeping runs (e.g. the report's copies)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.paused or func.is_view or name in self._FREE):
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def value(self):
        return len(self.names)


@contextlib.contextmanager
def count_torch_kernels():
    """Count the kernels launched by torch operators inside the block (eager PyTorch's launches).

    `.value` is the count, `.names` the operators, e.g. for torchvision's GoogLeNet block:
    6 convolutions, 6 batch norms, 6 ReLUs, 1 max pool and 1 cat = 20. Triton launches don't go
    through the dispatcher: add `count_launches()` for a fused model's total.
    """
    mode = _TorchKernelCounter()
    with mode:
        yield mode
