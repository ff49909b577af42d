"""Ray: the only module that imports it. Workers run as actors, one per GPU (or CPU workers on
machines without one), placed through a placement group; a local Ray instance is started when no
cluster address is given.

Actors restart when their process or node dies (``max_restarts``); Ray rebuilds a restarted actor
with its original arguments, so it comes back holding its calibration shard at block 0, and the
sequential schedule replays the committed blocks on it
(:meth:`admmq_dist.run.sequential.SequentialSchedule.run_block_with_restarts`).

Ray is a dependency of the package, but a machine without it (a bare GPU node) can still run
in-process: the import is allowed to fail until Ray workers are asked for.
"""

from __future__ import annotations

import logging
import os
import time

from ..recipe import Recipe
from .backends import WorkerLost, worker_class

try:
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # pragma: no cover - exercised on machines without Ray
    ray = None

log = logging.getLogger(__name__)


class RayBackend:
    """``workers`` actors on a local Ray instance, or on the cluster at ``address``
    (``auto``, ``ray://host:port``)."""

    def __init__(self, workers: int, *, address: str | None = None, threads: int | None = None,
                 gpu: bool = False, max_restarts: int = 3) -> None:
        if ray is None:
            raise RuntimeError("Ray is not installed here (pip install ray); run without "
                               "--workers/--address to quantize in this process")
        if workers < 1:
            raise ValueError(f"--workers {workers}: must be at least 1")
        self.requested = workers
        self.gpu = gpu
        self.threads = threads or 1
        self.max_restarts = max_restarts
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                # A private local instance: no dashboard, quiet logs, workers see this package.
                ray.init(num_cpus=max(os.cpu_count() or 1, workers * self.threads),
                         include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
            else:
                ray.init(address=address, log_to_driver=False)
            self._owns_ray = True
        bundle = {"CPU": self.threads, **({"GPU": 1} if gpu else {})}
        self._pg = placement_group([bundle] * workers, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=120)
        except Exception:
            remove_placement_group(self._pg)
            raise RuntimeError(
                f"Ray could not place {workers} workers of {bundle} each within 2 minutes; the "
                f"cluster has {ray.cluster_resources()}. Use fewer --workers or --threads") from None
        self.actors: list = []
        self._tokens: list[str] = []

    @property
    def size(self) -> int:
        return len(self.actors)

    def start(self, model_dir: str, recipe: Recipe, shards, device: str) -> None:
        actor_cls = ray.remote(worker_class(recipe))
        self.actors = [
            actor_cls.options(
                max_restarts=self.max_restarts, max_task_retries=0,
                num_cpus=self.threads, num_gpus=1 if self.gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg,
                                                                     placement_group_bundle_index=i),
            ).remote(model_dir, recipe, shard, "cuda" if self.gpu else device, self.threads)
            for i, shard in enumerate(shards)]
        self._tokens = self.get([a.ping.remote() for a in self.actors])

    def call(self, w: int, method: str, *args):
        return getattr(self.actors[w], method).remote(*args)

    def get(self, futures):
        try:
            return ray.get(list(futures))
        except (RayActorError, ActorUnavailableError) as exc:
            raise WorkerLost(str(exc).splitlines()[0]) from exc
        except RayTaskError as exc:
            # An exception inside a worker: re-raise it as itself, with the worker's traceback.
            raise exc.as_instanceof_cause() from None

    def restarted(self) -> list[int]:
        """Workers rebuilt since they were started or last checked (waits for them to be up)."""
        out = []
        for w, actor in enumerate(self.actors):
            deadline = time.monotonic() + 600
            while True:
                try:
                    token = ray.get(actor.ping.remote(), timeout=600)
                    break
                except (RayActorError, ActorUnavailableError):
                    # Restarting: Ray rebuilds the actor (its constructor replays block 0's
                    # calibration capture) before it answers again.
                    if time.monotonic() > deadline:
                        raise WorkerLost(f"worker {w} did not come back within 10 minutes") from None
                    time.sleep(1)
            if token != self._tokens[w]:
                out.append(w)
                self._tokens[w] = token
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self._pg)
        if self._owns_ray:
            ray.shutdown()
