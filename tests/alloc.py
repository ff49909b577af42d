"""Peak live tensor bytes of real code on CPU, measured by torch's own allocation tracking.

With ``profile_memory=True`` the profiler records every allocation and free that goes through
c10's CPU allocator together with the allocator's running total; the peak of that total is the
most tensor memory the code held at once beyond what was allocated before it started (tensors
that existed before and are freed inside count negative). Not counted: memory a library takes
with its own ``malloc`` (MKL's and LAPACK's internal buffers; torch's own LAPACK workspaces are
tensors and are counted), and the Python objects around the tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def peak_allocated(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak bytes)``: the highest total of live CPU tensor bytes while ``fn`` ran,
    counted from zero at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation" \
                and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, peak
