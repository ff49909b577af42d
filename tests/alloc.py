"""Peak live tensor bytes of real code on CPU, measured by torch's own allocation tracking.

With ``profile_memory=True`` the profiler records every allocation and free that goes through
c10's CPU allocator together with the allocator's running total; the peak of that total is the
most tensor memory the code held at once beyond what was allocated before it started (tensors
that existed before and are freed inside count negative). Not counted: memory a library takes
with its own ``malloc`` (MKL's and LAPACK's internal buffers; torch's own LAPACK workspaces are
tensors and are counted), the Python objects around the tensors, and files mapped into memory
(safetensors maps a whole shard to read one tensor from it; the pages are the file's, and only
the copied tensor is the code's): a mapping reports itself with a running total of 0, which no
allocation through the CPU allocator can.
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
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr,
                           fields.total_allocated))
        stack.extend(node.children)
    live = peak = 0
    mapped = set()
    for _, size, ptr, total in sorted(events):
        if size > 0 and total == 0:
            mapped.add(ptr)
        elif size < 0 and ptr in mapped:
            mapped.discard(ptr)
        else:
            live += size
            peak = max(peak, live)
    return result, peak
