"""Several Ray nodes on this machine (ray.cluster_utils.Cluster: a head and three nodes, each its
own raylet, object store and resources), as a user's cluster is: a GPU-less head with GPU nodes
gets one worker per GPU (the GPUs are declared resources here: placement and the device each
worker is told are checked, CUDA itself is not needed); a job started where a cluster runs joins
it; workers spread over nodes write the in-process bytes; a node lost between steps or during
one (a block's capture, solve or propagation; a round of each round schedule), a worker that
hangs, and a node out of host memory each end in the uninterrupted bytes or one clear error."""

import os
import re
import time

import pytest
import torch

from admmq_dist.run.faults import HostOutOfMemory

from runs import digest, quantize
from tiny import tiny_model_dir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    # As on a cluster's node (KubeRay and `ray start` set it): every raylet here shares one IP,
    # so "auto" alone could attach the driver to the wrong one.
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    yield cluster, nodes
    if before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = before
    cluster.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    quantize(model_dir, out)
    return digest(out)


def test_a_gpu_less_head_places_one_worker_per_gpu_node(cluster):
    from admmq_dist.run.ray_backend import RayBackend

    _, nodes = cluster
    backend = RayBackend(2)  # no address: joins the cluster running here
    try:
        assert backend.gpu and backend.device == "cuda"
        placed = [p["node"] for p in backend.placement]
        assert len(set(placed)) == 2 and set(placed) <= {n.node_id for n in nodes}
        assert all(p["gpu_ids"] and p["cuda_visible_devices"] is not None
                   for p in backend.placement)
        assert all(p["environment"]["device"] == "cuda" for p in backend.placement)
    finally:
        backend.shutdown()
    backend = RayBackend(2, worker_device="cpu")
    try:
        assert not backend.gpu and all(not p["gpu_ids"] for p in backend.placement)
    finally:
        backend.shutdown()
    with pytest.raises(RuntimeError, match=r"has 3 GPU\(s\) and 4 workers need one each"):
        RayBackend(4)


def test_each_node_finds_the_model_itself_and_a_node_without_it_stops_in_one_line(cluster,
                                                                                 model_dir):
    from admmq_dist.model.loading import ModelLoadError, ModelSource
    from admmq_dist.run.ray_backend import RayBackend

    source = ModelSource.of("org/tiny", model_dir)
    backend = RayBackend(2, worker_device="cpu")
    try:
        assert backend._locate(source, 2) == [str(model_dir)] * 2
        elsewhere = ModelSource(source.name, source.path + "-not-mounted", None, source.content)
        with pytest.raises(ModelLoadError) as caught:
            backend._locate(elsewhere, 2)
        assert "does not exist here" in str(caught.value) and "ray::" not in str(caught.value)
        assert len(str(caught.value).splitlines()) == 1
    finally:
        backend.shutdown()


def test_worker_logs_reach_the_driver_prefixed_by_the_worker(cluster, model_dir, tmp_path,
                                                            capfd):
    quantize(model_dir, tmp_path / "out", workers=2, worker_device="cpu", log_level="DEBUG")
    seen, deadline = "", time.monotonic() + 60
    while seen.count("worker ready on") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray forwards workers' output from a thread of its own
        seen += capfd.readouterr().err
    ready = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in seen.splitlines()
             if "worker ready on" in line]
    assert len(ready) >= 2, seen[-6000:]
    # Ray's prefix names the worker (its class and process) on every forwarded line.
    assert all(re.match(r"\((Worker|SegmentWorker|CoordinatedWorker) pid=\d+", line)
               for line in ready), ready
    assert len({re.match(r"\(\w+ pid=(\d+)", line).group(1) for line in ready}) >= 2


def _capture_backend(monkeypatch):
    from admmq_dist.run.ray_backend import RayBackend

    backends, original = [], RayBackend.start

    def start(self, *args):
        original(self, *args)
        backends.append(self)

    monkeypatch.setattr(RayBackend, "start", start)
    return backends


def test_two_nodes_write_the_in_process_bytes_and_survive_a_lost_node(cluster, model_dir,
                                                                      reference, tmp_path,
                                                                      monkeypatch):
    """Worker 1's whole node is removed after block 0: its placement moves to the spare node,
    the worker is rebuilt there and the run writes the in-process bytes."""
    c, nodes = cluster
    backends = _capture_backend(monkeypatch)
    summary = quantize(model_dir, tmp_path / "two", workers=2, worker_device="cpu")
    assert digest(tmp_path / "two") == reference and summary["faults"] == []
    assert len({p["node"] for p in backends[-1].placement}) == 2
    removed = []

    def remove_after(b):
        if b == 0 and not removed:
            node_id = backends[-1].placement[1]["node"]
            node = next(n for n in nodes if n.node_id == node_id)
            c.remove_node(node, allow_graceful=False)
            removed.append(node_id)

    summary = quantize(model_dir, tmp_path / "lost", workers=2, worker_device="cpu",
                       on_block=remove_after)
    assert removed and digest(tmp_path / "lost") == reference
    assert [f["restarted_workers"] for f in summary["faults"]] == [[1]]
    nodes[:] = [n for n in nodes if n.node_id not in removed] + [
        c.add_node(num_cpus=1, num_gpus=1)]
    c.wait_for_nodes()


def _recipe(schedule, config="plain"):
    """The cells' recipe; ``config`` "default" keeps the recipe's default calibration
    (asymmetric "auto": on) where "plain" pins the plain objective as the other run tests do."""
    from admmq_dist.recipe import Recipe, override

    from runs import SETTINGS

    calibration = {**SETTINGS["calibration"], "asymmetric": "auto"} if config == "default" \
        else SETTINGS["calibration"]
    return override(Recipe(), {**SETTINGS, "calibration": calibration, "solver": {
        **SETTINGS["solver"], "admm": {"iterations": 10}, "schedule": schedule, "segments": 3,
        "rounds": 2, "coordinated_rounds": 3}})


def _remove_during(monkeypatch, cluster, method, block):
    """Worker 1's first call of ``method`` (on ``block``, when given) is issued, then its whole
    node is removed while the call is in flight; returns the removed nodes' ids."""
    from admmq_dist.run.ray_backend import RayBackend

    c, nodes = cluster
    original, removed = RayBackend.call, []

    def call(self, w, name, *args):
        ref = original(self, w, name, *args)
        if w == 1 and name == method and not removed and block in (None, args[0]):
            node = next(n for n in nodes if n.node_id == self.placement[1]["node"])
            c.remove_node(node, allow_graceful=False)
            removed.append(node.node_id)
        return ref

    monkeypatch.setattr(RayBackend, "call", call)
    return removed


# Capture and propagate are the matrix's alone (benchmarks/fault_matrix.py; marker "matrix"):
# the suite keeps one sequential step, the solve, whose recovery found a bug, to stay in CI's time.
# The round schedules' cells too (68 s; CI was at 35.9 min): a round schedule's rebuilt worker
# is tested in the suite by test_ray's killed workers and test_faults' cells, the node's removal
# here by the sequential cell. The default configuration's cells (asymmetric calibration, the
# coordinated schedule's sequential start faulted too) are the matrix's.
STEPS = [("sequential", "capture", 1), ("sequential", "solve", 1),
         ("sequential", "propagate", 1), ("depth-parallel", "run_round", None),
         ("coordinated", "iterate", None)]


@pytest.mark.parametrize("config,schedule,method,block", [
    pytest.param("plain", *step, marks=() if step[2] == "solve" else pytest.mark.matrix)
    for step in STEPS] + [
    pytest.param("default", *step, marks=pytest.mark.matrix)
    for step in STEPS + [("coordinated", "sequential_start", 1)]])
def test_a_node_removed_during_a_step_costs_time_not_bytes(cluster, model_dir, tmp_path,
                                                          monkeypatch, config, schedule, method,
                                                          block):
    """Worker 1's node dies while its call runs (block 1's capture, solve or propagation; the
    first round of a round schedule; block 1 of the coordinated schedule's sequential start): the
    worker is rebuilt on the spare node and the run ends in the in-process bytes. A replacement
    node is added afterwards, for the next cells."""
    from admmq_dist.run.job import quantize_model

    def run(out, **kw):
        return quantize_model(str(model_dir), out, _recipe(schedule, config),
                              device=torch.device("cpu"), progress=False, threads=1, **kw)

    run(tmp_path / "local")
    c, nodes = cluster
    removed = _remove_during(monkeypatch, cluster, method, block)
    try:
        summary = run(tmp_path / "ray", workers=2, worker_device="cpu")
    finally:
        monkeypatch.undo()
        nodes[:] = [n for n in nodes if n.node_id not in removed] + [
            c.add_node(num_cpus=1, num_gpus=1) for _ in removed]
        c.wait_for_nodes()
    assert removed, f"worker 1 was never asked for {method}"
    assert digest(tmp_path / "ray") == digest(tmp_path / "local")
    assert [f["restarted_workers"] for f in summary["faults"]] == [[1]]


def test_a_task_whose_input_was_lost_with_a_node_is_a_lost_worker(monkeypatch):
    """What a node removed during block 1's solve gave (the redone block's load_block on worker
    0 failed: its argument, computed on worker 1, was lost with worker 1's node — Ray's
    RayTaskError(ActorUnavailableError)): a lost worker, recovered like one, not the worker's
    own error stopping the run with Ray's traceback."""
    import ray
    from ray.exceptions import ActorUnavailableError, ObjectLostError, RayTaskError

    from admmq_dist.run.faults import WorkerLost
    from admmq_dist.run.ray_backend import RayBackend

    backend = object.__new__(RayBackend)  # get() alone: no cluster needed
    backend.step_timeout, backend._owner = None, {}

    def fail_with(cause):
        error = RayTaskError("Worker.load_block", "Traceback", cause).as_instanceof_cause()
        monkeypatch.setattr(ray, "get", lambda refs: (_ for _ in ()).throw(error))

    for cause in (ActorUnavailableError("The actor is temporarily unavailable", None),
                  ObjectLostError("ab" * 14, None, "")):
        fail_with(cause)
        with pytest.raises(WorkerLost, match=type(cause).__name__):
            backend.get([])
    fail_with(ValueError("bad input"))  # the worker's own error stays itself
    with pytest.raises(ValueError):
        backend.get([])


def _inject(monkeypatch, method, action):
    """Worker 1's first call of ``method`` runs ``action`` in the worker instead."""
    from admmq_dist.run.ray_backend import RayBackend

    original, fired = RayBackend.call, []

    def call(self, w, name, *args):
        if w == 1 and name == method and not fired:
            fired.append(name)
            ref = self.actors[w].__ray_call__.remote(action)
            self._owner[ref] = w
            return ref
        return original(self, w, name, *args)

    monkeypatch.setattr(RayBackend, "call", call)
    return fired


def test_a_hung_worker_passes_its_deadline_and_is_rebuilt(cluster, model_dir, reference,
                                                         tmp_path, monkeypatch):
    fired = _inject(monkeypatch, "solve", lambda worker: time.sleep(3600))
    started = time.monotonic()
    summary = quantize(model_dir, tmp_path / "out", workers=2, worker_device="cpu",
                       step_timeout=20)
    assert fired and time.monotonic() - started < 600
    assert digest(tmp_path / "out") == reference
    # The hung worker's deadline, and on a loaded machine perhaps a slow healthy step's too
    # (CI runs other stages beside this suite): each is a rebuild, none changes a byte.
    assert summary["faults"] and all("step deadline" in f["error"] for f in summary["faults"])
    assert summary["step_timeout_seconds"] == 20


def test_a_node_out_of_host_memory_stops_at_once_naming_resume(cluster, model_dir, tmp_path,
                                                               monkeypatch):
    from ray.exceptions import OutOfMemoryError

    def oom(worker):
        raise OutOfMemoryError("Task was killed due to the node running low on memory")

    fired = _inject(monkeypatch, "solve", oom)
    with pytest.raises(HostOutOfMemory, match="--resume") as info:
        quantize(model_dir, tmp_path / "out", workers=2, worker_device="cpu",
                 max_worker_restarts=3)
    assert fired == ["solve"] and "retrying would repeat it" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert torch.get_num_threads() >= 1
