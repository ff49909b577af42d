"""What runs the workers. A backend starts one worker per calibration shard and calls their
methods by name: :class:`LocalBackend` in this process (any number of workers, one after
another — tests and single-device runs), :class:`admmq_dist.run.ray_backend.RayBackend` as Ray
actors. Schedules see only this interface, so nothing they decide depends on which it is."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..model.loading import ModelSource, located
from ..recipe import Recipe
from .coordinated_worker import CoordinatedWorker
from .faults import WorkerLost  # noqa: F401  (schedules and backends raise it from here)
from .segment_worker import SegmentWorker
from .worker import Worker


class Backend(Protocol):
    requested: int  # workers asked for; ``size`` is how many run once started

    def start(self, model_dir: str, recipe: Recipe, shards: list[dict[int, torch.Tensor]],
              device: str) -> None: ...

    @property
    def size(self) -> int: ...

    def call(self, w: int, method: str, *args) -> Any:
        """Start ``method`` on worker ``w``; :meth:`get` waits for the results."""

    def get(self, futures) -> list: ...

    def restarted(self) -> list[int]:
        """Workers rebuilt (fresh, at block 0) since last asked."""

    def shutdown(self) -> None: ...


def worker_class(recipe: Recipe) -> type:
    return {"depth-parallel": SegmentWorker, "coordinated": CoordinatedWorker}.get(
        recipe.solver.schedule, Worker)


class LocalBackend:
    """``workers`` workers in this process, called one after another. Bytes are the same as with
    any other backend and worker count (each worker sees only its own shard)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        self.requested = workers
        self.workers: list = []

    def start(self, model_dir: str | ModelSource, recipe: Recipe,
              shards: list[dict[int, torch.Tensor]], device: str) -> None:
        cls = worker_class(recipe)
        model_dir = located(model_dir)
        self.workers = [cls(model_dir, recipe, shard, device, None) for shard in shards]

    @property
    def size(self) -> int:
        return len(self.workers)

    def call(self, w: int, method: str, *args):
        return getattr(self.workers[w], method)(*args)

    def get(self, futures) -> list:
        return list(futures)

    def restarted(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        self.workers = []
