"""A fault-injection backend: in-process workers (as :class:`LocalBackend`) that die or fail at
planned calls, the way Ray actors do on a cluster.

A :class:`Fault` names a worker method, which worker, and at which call (``block``: the first
call whose first argument is that block; else ``nth``: the n-th call of that method on that
worker); its ``kind`` is what happens:

- ``"kill"``: the worker's process dies during the call: it is rebuilt from its constructor
  arguments (as Ray rebuilds a restarted actor: fresh, at block 0) and the call raises
  :class:`WorkerLost`;
- ``"kill-between"``: the call runs and returns, then the worker dies and is rebuilt silently —
  nothing fails until the schedule next talks to it;
- ``"kill-after"``: the call runs to completion — its effects happen: files it writes (a round's
  commit, a block of the sequential start), state it changes on the worker, a partial sum folded
  in — then the worker dies before its answer reaches the schedule: it is rebuilt and the call
  raises :class:`WorkerLost` (the effects are there, their acknowledgement is lost);
- ``"lost-reply"``: as ``"kill-after"``, but the worker lives on, holding what the call did
  (Ray's ``ActorUnavailableError``: the actor was unreachable for a while, the call may have
  run): nothing is rebuilt, so a redone step meets the first attempt's effects;
- ``"raise"``: the method raises (a bug, or bad input): not a lost worker, not to be retried.
"""

from __future__ import annotations

from dataclasses import dataclass

from admmq_dist.model.loading import located
from admmq_dist.run.backends import LocalBackend, worker_class
from admmq_dist.run.faults import WorkerLost


class InjectedError(RuntimeError):
    pass


@dataclass
class Fault:
    method: str
    kind: str = "kill"
    worker: int = 1
    block: int | None = 1
    nth: int = 1
    fired: bool = False

    def matches(self, w: int, method: str, args: tuple, count: int) -> bool:
        if self.fired or w != self.worker or method != self.method:
            return False
        if self.block is not None:
            return bool(args) and args[0] == self.block
        return count == self.nth


class FaultyBackend(LocalBackend):
    def __init__(self, workers: int, faults: list[Fault]) -> None:
        super().__init__(workers)
        self.faults = faults
        self.counts: dict[tuple[int, str], int] = {}
        self.rebuilt: list[int] = []

    def start(self, model_dir, recipe, shards, device) -> None:
        # A rebuilt worker gets the folder its first build found (the job hands a ModelSource).
        self._args = (located(model_dir), recipe, shards, device)
        super().start(model_dir, recipe, shards, device)

    def _rebuild(self, w: int) -> None:
        model_dir, recipe, shards, device = self._args
        self.workers[w] = worker_class(recipe)(model_dir, recipe, shards[w], device, None)
        self.rebuilt.append(w)

    def call(self, w: int, method: str, *args):
        key = (w, method)
        self.counts[key] = self.counts.get(key, 0) + 1
        fault = next((f for f in self.faults
                      if f.matches(w, method, args, self.counts[key])), None)
        if fault is None:
            return super().call(w, method, *args)
        fault.fired = True
        if fault.kind == "raise":
            raise InjectedError(f"injected failure in {method} on worker {w}")
        if fault.kind == "kill":
            self._rebuild(w)
            raise WorkerLost(f"worker {w} died in {method}")
        result = super().call(w, method, *args)
        if fault.kind == "lost-reply":
            raise WorkerLost(f"worker {w} ran {method} but its answer was lost")
        self._rebuild(w)
        if fault.kind == "kill-after":
            raise WorkerLost(f"worker {w} died after {method} ran, before it answered")
        return result

    def restarted(self) -> list[int]:
        out, self.rebuilt = sorted(set(self.rebuilt)), []
        return out
