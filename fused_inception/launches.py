"""Counting kernel launches: the report and the tests read the counter kept by the kernel launcher."""

import contextlib

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
