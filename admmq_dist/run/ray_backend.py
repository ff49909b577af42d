"""Ray: the only module that imports it. Workers run as actors placed through a placement group:
one per GPU when the *cluster* has GPUs (a GPU-less head with GPU nodes is the normal case), CPU
workers otherwise, or as ``worker_device`` says. A private local Ray instance is started when no
cluster runs here and no address is given; when one runs (a cluster node, a notebook, a test
cluster) the job joins it and says so; ``address="local"`` asks for a private one regardless.

Actors restart when their process or node dies (``max_restarts``); Ray rebuilds a restarted actor
with its original arguments, so it comes back holding its calibration shard at block 0, and the
schedules bring it back to the last commit. Everything Ray reports when a worker or its node is
gone — a dead actor, objects lost with their node or owner — is a lost worker; a worker that does
not answer within the step deadline is killed and counts as lost too; a node out of host memory
stops the run at once (retrying would only repeat it). Worker logs reach the driver's terminal,
prefixed by Ray with the worker.

``cluster_get``/``cluster_put``/``cluster_nodes`` read and write the cluster's key-value store and
count its nodes without joining it as a driver (the processes of an `accelerate launch` use them to
wait for each other and hand on rank 0's status: run/launched.py).

Ray is a dependency of the package, but a machine without it (a bare GPU node) can still run
in-process: the import is allowed to fail until Ray workers are asked for.
"""

from __future__ import annotations

import logging
import os
import time

from ..model.loading import ModelLoadError, ModelSource, located
from ..recipe import Recipe
from .backends import worker_class
from .faults import HostOutOfMemory, WorkerLost
from .fingerprint import device_environment

# Seconds a worker may take to be built (or rebuilt) and answer its first ping, whatever a
# shorter --step-timeout says: the deadline is for steps, and a process start is not one.
STARTUP_TIMEOUT_S = 600.0

try:
    import ray
    from ray.exceptions import (ActorUnavailableError, GetTimeoutError, NodeDiedError,
                                ObjectLostError, OutOfMemoryError, OwnerDiedError,
                                RayActorError, RayTaskError, WorkerCrashedError)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    # What a lost process or node looks like from the driver (ObjectReconstructionFailedError
    # and its kin are ObjectLostErrors).
    LOST = (RayActorError, ActorUnavailableError, ObjectLostError, OwnerDiedError,
            NodeDiedError, WorkerCrashedError)
except ImportError:  # pragma: no cover - exercised on machines without Ray
    ray = None

log = logging.getLogger(__name__)


_GCS: dict = {}  # address -> a client of that cluster's GCS


def _gcs(address: str):
    """A client of the cluster's control store (Ray's GCS): no driver, no raylet, no session."""
    if ray is None:
        raise RuntimeError("Ray is not installed here (pip install 'admmq-dist[ray]')")
    if address not in _GCS:
        _GCS[address] = ray._raylet.GcsClient(address=address)
    return _GCS[address]


def cluster_get(address: str, key: str, timeout: float = 5.0) -> str | None:
    """``key``'s value in the key-value store of the cluster at ``address`` (None: unset)."""
    value = _gcs(address).internal_kv_get(key.encode(), b"admmq", timeout=timeout)
    return None if value is None else value.decode()


def cluster_put(address: str, key: str, value: str, timeout: float = 5.0) -> None:
    _gcs(address).internal_kv_put(key.encode(), value.encode(), True, b"admmq", timeout=timeout)


def cluster_nodes(address: str, timeout: float = 5.0) -> int:
    """How many nodes of the cluster at ``address`` are alive."""
    nodes = _gcs(address).get_all_node_info(timeout=timeout).values()
    return sum(1 for node in nodes if node.state == GcsNodeInfo.ALIVE)


def _probe(device: str) -> dict:
    """Run in each worker's slot before the workers start: where it landed and what it sees."""
    return {"node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "environment": device_environment(device)}


def _out_of_memory(exc: BaseException) -> bool:
    """Ray's memory monitor killed the worker (host memory), as opposed to a lost process."""
    return isinstance(exc, OutOfMemoryError) or "memory monitor" in str(exc) \
        or "OutOfMemoryError" in str(exc)


def _lost_cause(exc: BaseException) -> bool:
    """A task failed because a worker or node it depended on was lost (e.g. an argument computed
    by an actor on a node that died), not because of an error of its own."""
    while isinstance(exc, RayTaskError) and exc.cause is not exc:
        exc = exc.cause
    return isinstance(exc, LOST)


def _cluster_started_here() -> str | None:
    """The cluster a bare ``ray.init()`` joins: ``RAY_ADDRESS``, else the one ``ray start`` began
    on this machine, else None. Not ``address="auto"``: its fallback joins any Ray instance it
    finds among this machine's processes - another run's private one, which ends with that run."""
    if os.environ.get("RAY_ADDRESS"):  # as given: a ray:// client address is no bootstrap one
        return os.environ["RAY_ADDRESS"]
    try:  # how ray.init() itself finds the last `ray start` (its address file in Ray's temp dir)
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray that moved it: only RAY_ADDRESS or --address name a cluster
        return None
    return canonicalize_bootstrap_address(None)


class RayBackend:
    """``workers`` actors on the Ray cluster at ``address`` (``auto``, ``ray://host:port``), the
    one ``ray start`` began here (or ``RAY_ADDRESS``), or a private local instance (``address``
    None with no such cluster, or ``"local"``). ``worker_device``: ``auto`` (one GPU per worker
    when the cluster has GPUs, else CPU), ``cuda`` or ``cpu``. ``step_timeout``: seconds a worker
    call may take before the worker is treated as lost (None: no deadline). ``log_level``: the
    workers' logging level (their records reach the driver's terminal)."""

    def __init__(self, workers: int, *, address: str | None = None, threads: int | None = None,
                 worker_device: str = "auto", max_restarts: int = 3,
                 step_timeout: float | None = None, log_level: str = "WARNING") -> None:
        if ray is None:
            raise RuntimeError("Ray is not installed here (pip install 'admmq-dist[ray]'); run "
                               "without --workers/--address to quantize in this process")
        if workers < 1:
            raise ValueError(f"--workers {workers}: must be at least 1")
        if worker_device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--worker-device {worker_device!r}: use auto, cuda or cpu")
        if step_timeout is not None and step_timeout <= 0:
            raise ValueError(f"--step-timeout {step_timeout}: must be a positive number of "
                             "seconds")
        self.requested = workers
        self.threads = threads or 1
        self.max_restarts = max_restarts
        self.step_timeout = step_timeout
        self.log_level = log_level
        self._owns_ray = False
        self._connect(address, workers)
        try:
            self.gpu = self._use_gpus(worker_device, workers)
        except Exception:
            if self._owns_ray:
                ray.shutdown()
            raise
        self.device = "cuda" if self.gpu else "cpu"
        # GPU workers compute on the GPU: one CPU each is enough to place them.
        bundle = {"CPU": 1, "GPU": 1} if self.gpu else {"CPU": self.threads}
        self._pg = placement_group([bundle] * workers, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=120)
        except Exception:
            remove_placement_group(self._pg)
            raise RuntimeError(
                f"Ray could not place {workers} workers of {bundle} each within 2 minutes; the "
                f"cluster has {ray.cluster_resources()}. Use fewer --workers or --threads") from None
        self._bundle = bundle
        self.placement = ray.get([
            ray.remote(_probe).options(**self._in_slot(i)).remote(self.device)
            for i in range(workers)])
        self.actors: list = []
        self._constructed_with: list = []  # the actors' constructor arguments, held for restarts
        self._tokens: list[str] = []
        self._owner: dict = {}  # object ref -> the worker computing it (for the deadline)

    def _connect(self, address: str | None, workers: int) -> None:
        if ray.is_initialized():
            log.warning("using the Ray instance this process is already connected to")
            return
        if address is None:
            address = _cluster_started_here()
            if address is not None:
                ray.init(address=address, log_to_driver=True)
                self._owns_ray = True
                log.warning("joining the Ray cluster started on this machine (%s); pass --address "
                            "local for a private Ray instance instead",
                            ", ".join(f"{v:g} {k}" for k, v in sorted(
                                ray.cluster_resources().items()) if k in ("CPU", "GPU")))
                return
            address = "local"
        if address == "local":
            # A private local instance: no dashboard; the workers see this package.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers * self.threads),
                     include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
        self._owns_ray = True

    def _use_gpus(self, worker_device: str, workers: int) -> bool:
        """Whether the workers get a GPU each, from what the cluster has (not this driver)."""
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if worker_device == "cpu" or (worker_device == "auto" and gpus == 0):
            return False
        if gpus < workers:
            raise RuntimeError(
                f"the Ray cluster has {gpus} GPU(s) and {workers} workers need one each; use "
                f"--workers {gpus} or fewer" + (", or --worker-device cpu" if gpus else
                                                 ", or --worker-device auto/cpu"))
        return True

    def _slot(self, i: int):
        return PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)

    def _in_slot(self, i: int) -> dict:
        """Options of a task run in worker ``i``'s slot (its node, its GPU)."""
        return {"num_cpus": self._bundle["CPU"], "num_gpus": self._bundle.get("GPU", 0),
                "scheduling_strategy": self._slot(i)}

    @property
    def environment(self) -> dict:
        """What changes float reductions on the workers (every worker's; they must agree)."""
        seen = [p["environment"] for p in self.placement]
        distinct = [e for i, e in enumerate(seen) if e not in seen[:i]]
        return distinct[0] if len(distinct) == 1 else {"workers": distinct}

    @property
    def size(self) -> int:
        return len(self.actors)

    def start(self, model_dir: str | ModelSource, recipe: Recipe, shards, device: str) -> None:
        paths = self._locate(model_dir, len(shards))
        actor_cls = ray.remote(worker_class(recipe))
        env = {"env_vars": {"ADMMQ_LOG_LEVEL": self.log_level}}
        # A restarted actor reads its constructor's arguments again from the object store (a
        # real calibration shard is past Ray's inline limit): the driver holds them for the
        # run, or reference counting frees them and every restart fails.
        self._constructed_with = [ray.put(recipe)] + [ray.put(shard) for shard in shards]
        self.actors = [
            actor_cls.options(
                max_restarts=self.max_restarts, max_task_retries=0, runtime_env=env,
                num_cpus=self._bundle["CPU"], num_gpus=self._bundle.get("GPU", 0),
                scheduling_strategy=self._slot(i),
            ).remote(paths[i], self._constructed_with[0], shard, self.device, self.threads)
            for i, shard in enumerate(self._constructed_with[1:])]
        # Building a worker (a Ray process, torch, the model's skeleton) is not a step: on a
        # loaded machine it can outlast a short --step-timeout, so it gets one of its own.
        self._tokens = self.get([self.call(w, "ping") for w in range(len(self.actors))],
                                start=True)

    def _locate(self, model: str | ModelSource, workers: int) -> list[str]:
        """The model's folder as each slot's node sees it (a worker is rebuilt on its node)."""
        if not isinstance(model, ModelSource):
            return [model] * workers
        try:
            return ray.get([ray.remote(located).options(**self._in_slot(i)).remote(model)
                            for i in range(workers)])
        except RayTaskError as exc:
            if isinstance(exc.cause, ModelLoadError):  # its one line, without Ray's traceback
                raise ModelLoadError(str(exc.cause)) from None
            raise

    def call(self, w: int, method: str, *args):
        ref = getattr(self.actors[w], method).remote(*args)
        self._owner[ref] = w
        return ref

    def get(self, futures, start: bool = False):
        """The futures' values, within the step deadline (``start``: the workers' first
        answer, within at least STARTUP_TIMEOUT_S)."""
        futures = list(futures)
        try:
            if self.step_timeout is not None:
                self._within_deadline(futures, start)
            return ray.get(futures)
        except RayTaskError as exc:
            if _out_of_memory(exc):
                raise self._host_oom(exc) from None
            if _lost_cause(exc):  # a task's argument was lost with its worker or node
                raise WorkerLost(f"{type(exc.cause).__name__}: "
                                 f"{str(exc.cause).splitlines()[0]}") from exc
            # An exception inside a worker: re-raise it as itself, with the worker's traceback.
            raise exc.as_instanceof_cause() from None
        except LOST as exc:
            if _out_of_memory(exc):
                raise self._host_oom(exc) from None
            raise WorkerLost(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        finally:
            for ref in futures:
                self._owner.pop(ref, None)

    def _within_deadline(self, futures: list, start: bool) -> None:
        """Wait for ``futures`` until the step (or start) deadline; the workers past it are
        killed (Ray rebuilds them) and the step fails as if they had been lost."""
        timeout = max(self.step_timeout, STARTUP_TIMEOUT_S) if start else self.step_timeout
        _, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout)
        if not pending:
            return
        hung = sorted({self._owner[ref] for ref in pending if ref in self._owner})
        for w in hung:
            ray.kill(self.actors[w], no_restart=False)
        raise WorkerLost(f"worker(s) {hung} did not answer within the "
                         f"{'start' if start else 'step'} deadline of "
                         f"{timeout:g} s (--step-timeout); killed and rebuilt")

    def _host_oom(self, exc: BaseException) -> HostOutOfMemory:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return HostOutOfMemory(
            f"a worker's node ran out of host memory and Ray's memory monitor stopped it "
            f"({first[:300]}); retrying would repeat it. `admmq plan` gives each worker's host "
            "peak: free memory on the nodes, run fewer workers per node, or use fewer "
            "--num-samples, then rerun with --resume (what was committed is kept)")

    def restarted(self) -> list[int]:
        """Workers rebuilt since they were started or last checked (waits for them to be up)."""
        out = []
        for w, actor in enumerate(self.actors):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    token = ray.get(actor.ping.remote(), timeout=STARTUP_TIMEOUT_S)
                    break
                except GetTimeoutError:
                    raise WorkerLost(f"worker {w} did not come back within 10 minutes") from None
                except LOST:
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
        self.actors, self._constructed_with = [], []
        remove_placement_group(self._pg)
        if self._owns_ray:
            ray.shutdown()
