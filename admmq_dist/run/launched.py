"""`accelerate launch` (or torchrun) starts the processes of a quantize job; Ray runs it.

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
every process. Rank 0 starts a Ray head on ``MASTER_ADDR`` (port ``MASTER_PORT + 1`` unless
``--ray-port`` says otherwise; the launcher's own rendezvous holds ``MASTER_PORT``), every other
rank joins it as a node, and each node offers what its process was given: its local GPU (the
``LOCAL_RANK``-th visible one) when CUDA is there, else ``threads`` CPUs, so the job's one worker
per process lands one on each node. Rank 0 drives the job as a Ray driver and writes the
checkpoint; the other ranks wait for its status in the cluster's key-value store, stop their
nodes, acknowledge, and exit with that status; rank 0 then stops the head. Nothing travels
outside Ray: the launcher only starts the processes.

Every node is one `ray start --block` child of its rank, in its own session and temporary folder,
stopped by that process alone (never `ray stop`, which would stop every Ray instance here).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .ray_backend import cluster_get, cluster_nodes, cluster_put

JOIN_SECONDS = 300.0  # how long ranks wait for each other (processes start at their own pace)
ACK_SECONDS = 60.0  # how long rank 0 waits for the others to leave before stopping the head
THREADS, STATUS = "launch:threads", "launch:status"


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int
    host: str  # MASTER_ADDR, resolved
    port: int  # the Ray head's

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def from_environment(ray_port: int | None = None, env=None) -> Launch | None:
    """The launch this process belongs to, or None for a single process (``accelerate launch
    --cpu`` starts just one, with no ``RANK``: it runs like a plain command)."""
    env = os.environ if env is None else env
    world = _number(env, "WORLD_SIZE", 1)
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: start "
                         "the processes with accelerate launch or torchrun")
    rank = _number(env, "RANK")
    port = ray_port or _number(env, "MASTER_PORT") + 1
    local_rank = _number(env, "LOCAL_RANK", rank)
    try:
        host = socket.gethostbyname(env["MASTER_ADDR"])
    except OSError as exc:
        raise ValueError(f"MASTER_ADDR={env['MASTER_ADDR']}: cannot resolve it ({exc})") from None
    return Launch(rank, world, local_rank, host, port)


def _number(env, key: str, default: int | None = None) -> int:
    try:
        return int(env.get(key) or default)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={env.get(key)!r}: the launcher's {key} is not a number") from None


def check(launch: Launch, workers: int | None, address: str | None) -> None:
    """Refuse, before anything starts, what a launched job cannot mean."""
    if address is not None:
        raise ValueError(f"--address {address}: under accelerate launch the launched processes "
                         "form their own Ray cluster (rank 0 is its head); drop --address")
    if workers is not None and workers != launch.world:
        raise ValueError(f"--workers {workers}: accelerate launch started {launch.world} "
                         f"processes, one worker each; drop --workers or launch {workers}")


def exit_on_sigterm() -> None:
    """A launcher stops its processes with SIGTERM: leave through the cleanup paths (the node
    this process started is stopped) as on Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def _finishing() -> None:
    """The job's outcome is known: the launcher's SIGTERM (sent once any rank has exited) must
    not cut short handing it on and stopping this process's node."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_gpu(local_rank: int) -> str | None:
    """The GPU this process was given (its LOCAL_RANK-th visible one), if CUDA is here."""
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[local_rank].strip() if visible else str(local_rank)


class _Node:
    """This process's Ray node: one `ray start --block` in its own session and temp folder."""

    def __init__(self, launch: Launch, threads: int) -> None:
        self.temp = tempfile.mkdtemp(prefix="admmq-ray-", dir="/tmp")  # short: socket paths
        self.log = Path(self.temp) / "ray-start.log"
        gpu = _local_gpu(launch.local_rank)
        env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once
        env.pop("RAY_ADDRESS", None)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                   "--num-cpus", str(threads), "--num-gpus", "0" if gpu is None else "1",
                   "--temp-dir", self.temp, "--disable-usage-stats",
                   "--dashboard-agent-listen-port", str(_free_port()),
                   "--metrics-export-port", str(_free_port())]
        if launch.rank == 0:
            command += ["--head", "--port", str(launch.port), "--node-ip-address", launch.host,
                        "--include-dashboard", "false"]
            if importlib.util.find_spec("grpc") is not None:  # Ray Client's server: 10001 else
                command += ["--ray-client-server-port", str(_free_port())]
        else:
            command += ["--address", launch.address]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            cwd=self.temp)

    def failure(self) -> str | None:
        """Why the node stopped (the last line `ray start` wrote), or None while it runs."""
        if self.process.poll() is None:
            return None
        lines = [x.strip() for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return f"`ray start` exited with {self.process.returncode}" + (
            f": {lines[-1][:300]}" if lines else "")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # What outlived it: this node's processes are the ones naming its private folder.
        found = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True)
        for pid in map(int, found.stdout.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def _reachable(launch: Launch) -> bool:
    try:
        socket.create_connection((launch.host, launch.port), timeout=2).close()
        return True
    except OSError:
        return False


def _ask(launch: Launch, what, node: _Node | None, seconds: float, failed: str):
    """``what()`` once it answers something other than None/False, polled every half second;
    ``failed`` (one line) when the node stops or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            answer = what()
        except Exception:  # the store is not up yet, or briefly unreachable
            answer = None
        if answer not in (None, False):
            return answer
        stopped = node.failure() if node is not None else None
        if stopped or time.monotonic() > deadline:
            raise RuntimeError(f"rank {launch.rank}: {failed}"
                               + (f" ({stopped})" if stopped else f" within {seconds:g} s"))
        time.sleep(0.5)


def drive(launch: Launch, threads: int, run) -> int:
    """Rank 0: start the head, wait for every rank's node, ``run(address)`` the job, and hand its
    status to the other ranks before stopping the head."""
    node, code, joined = _Node(launch, threads), 1, False
    try:
        _ask(launch, lambda: _reachable(launch), node, JOIN_SECONDS,
             f"could not start the Ray head on {launch.address} (--ray-port)")
        _ask(launch, lambda: cluster_put(launch.address, THREADS, str(threads)) or True, node,
             60, f"could not write to the Ray head at {launch.address}")
        _ask(launch, lambda: cluster_nodes(launch.address) >= launch.world, node, JOIN_SECONDS,
             f"not every launched process joined the Ray head at {launch.address} (expected "
             f"{launch.world} nodes)")
        joined = True
        code = run(launch.address)
        return code
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        _finishing()
        if node.failure() is None:
            _release(launch, code, node, wait=joined)
        node.stop()


def _release(launch: Launch, code: int, node: _Node, wait: bool) -> None:
    """Give the other ranks rank 0's status and wait (bounded) until they have left."""
    try:
        cluster_put(launch.address, STATUS, str(code))
        if wait:
            _ask(launch, lambda: all(cluster_get(launch.address, f"launch:left:{r}")
                                     for r in range(1, launch.world)), node, ACK_SECONDS,
                 "the other ranks did not stop their Ray nodes")
    except RuntimeError as exc:
        print(f"admmq: warning: {exc}", file=sys.stderr)


def serve(launch: Launch) -> int:
    """A rank other than 0: join the head as a node offering this process's device, wait for
    rank 0's job to end, leave, and return its status."""
    _ask(launch, lambda: _reachable(launch), None, JOIN_SECONDS,
         f"could not reach the Ray head of rank 0 at {launch.address} (is rank 0 running, and "
         f"port {launch.port} open between the machines? --ray-port picks another)")
    threads = int(_ask(launch, lambda: cluster_get(launch.address, THREADS), None, JOIN_SECONDS,
                       f"the Ray head at {launch.address} gave no job settings"))
    node = _Node(launch, threads)
    try:
        # While rank 0 runs the job: as long as it takes (rank 0 is bounded by its own deadlines).
        status = _ask(launch, lambda: cluster_get(launch.address, STATUS), node, float("inf"),
                      "its Ray node stopped before the job ended")
        _finishing()
    finally:
        node.stop()
    try:
        cluster_put(launch.address, f"launch:left:{launch.rank}", "1")
        # Leave after rank 0 (it stops the head once every rank has left): a launcher stops
        # every process when one fails, and rank 0 is the one with the story to tell.
        _ask(launch, lambda: not _reachable(launch), None, ACK_SECONDS + 30, "")
        if int(status):
            time.sleep(5)  # rank 0 is finishing: let the launcher see its failure first
    except Exception:  # rank 0 stopped waiting; its status is what counts
        pass
    return int(status)
