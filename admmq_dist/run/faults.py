"""What can go wrong with a worker, and how many times a run lets it.

A worker is *lost* when its process or node dies (:class:`WorkerLost`, raised by the backend); a
worker is *out of position* when it is asked for a step that does not follow what it holds
(:class:`PositionError`, raised by the worker) — the sign of a worker rebuilt between two calls,
which no failed call announced. Both mean the same to a schedule: bring every worker back to a
committed state and redo the step. :class:`FaultLog` counts them against ``--max-worker-restarts``
and keeps what was redone for the run's summary.
"""

from __future__ import annotations


class WorkerLost(RuntimeError):
    """A worker died (its process or node); the backend restarts it and the work is redone."""


class PositionError(RuntimeError):
    """A worker was asked for a step that does not follow its own position (e.g. a rebuilt
    worker, back at block 0, asked to capture block 5): nothing was changed."""


class HostOutOfMemory(MemoryError):
    """A worker's node ran out of host memory (Ray's memory monitor): not a lost worker — redoing
    the step would run out again — so the run stops at once, its commits kept for --resume."""


class TooManyFaults(RuntimeError):
    """The run lost workers more often than ``--max-worker-restarts`` allows."""


RECOVERABLE = (WorkerLost, PositionError)


class FaultLog:
    """Faults seen so far, and the budget for them."""

    def __init__(self, max_restarts: int) -> None:
        if max_restarts < 0:
            raise ValueError(f"--max-worker-restarts {max_restarts}: must be at least 0")
        self.max_restarts = max_restarts
        self.faults: list[dict] = []

    def record(self, where: str, error: BaseException, restarted: list[int], redo: str) -> None:
        """Note a fault at ``where`` and what will be redone; raises :class:`TooManyFaults` once
        more than ``max_restarts`` were seen."""
        self.faults.append({"where": where, "error": f"{type(error).__name__}: {error}",
                            "restarted_workers": restarted, "redone": redo})
        if len(self.faults) > self.max_restarts:
            raise TooManyFaults(
                f"workers were lost {len(self.faults)} times (last at {where}: {error}), more "
                f"than --max-worker-restarts {self.max_restarts} allows; what was committed is "
                "kept: fix the cause (node health, memory) and rerun with --resume") from error
