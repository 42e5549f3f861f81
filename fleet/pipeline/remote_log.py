"""A learner's log from another process (a Ray training task, rank 0 of Ray Train's workers), brought to
the driver's log (the tracker: ``metrics.jsonl`` and W&B) while it trains, not after.

    with LogStream(tracker_log) as remote_log:      # remote_log goes to the learner, on any node
        result = fit(..., log=remote_log)           # the driver logs what arrives every POLL_S meanwhile

The learner's ``remote_log(metrics, env_steps)`` hands each record to a Ray actor (the sink, on the
driver's node, no CPU); a thread of the driver takes what has arrived every ``poll_s`` and passes it to
the driver's ``log``, in the order the learner logged it. When the block ends (the training returned or
failed) the thread stops and the rest is taken, so every record logged before the end reaches ``log``.
A learner restarted from a checkpoint (Ray Train's ``max_failures``, a retried task) logs the steps since
that checkpoint again: the log shows both attempts.
"""

from __future__ import annotations

import logging
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often the driver takes what the learner logged


@ray.remote(num_cpus=0)
class _Sink:
    def __init__(self):
        self.records: list = []

    def add(self, metrics: dict, env_steps: int) -> None:
        self.records.append((metrics, env_steps))

    def take(self) -> list:
        records, self.records = self.records, []
        return records


class RemoteLog:
    """The learner's ``log(metrics, env_steps)`` in another process: each record to the driver's sink.
    Each call waits for the sink to hold the record, so nothing is left in flight when the learner's
    process ends. A sink that is gone (its node, the driver's, lost) ends the log, never the training."""

    def __init__(self, sink):
        self.sink = sink
        self.lost = False

    def __call__(self, metrics: dict, env_steps: int) -> None:
        if self.lost:
            return
        try:
            ray.get(self.sink.add.remote({k: float(v) for k, v in metrics.items()}, int(env_steps)))
        except ray.exceptions.ActorDiedError as exc:  # gone for good (ActorUnavailableError, a blip, is not caught: the call raises)
            self.lost = True
            log.warning("the driver's log sink is gone (%s); this learner's curves stop here, its training goes on", str(exc).splitlines()[0][:200])


class LogStream:
    """``with LogStream(log) as remote_log:``: see the module's docstring. ``log`` None: ``remote_log`` is None."""

    def __init__(self, log, poll_s: float = POLL_S):
        self.log, self.poll_s = log, poll_s
        self._sink = self._thread = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> RemoteLog | None:
        if self.log is None:
            return None
        here = ray.get_runtime_context().get_node_id()  # the sink lives and dies with the driver's node, whichever node a learner runs on
        self._sink = _Sink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
        self._thread = threading.Thread(target=self._poll, name="remote-log", daemon=True)
        self._thread.start()
        return RemoteLog(self._sink)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._sink is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            if self._error is None:
                self._deliver()  # what arrived since the last poll: all of it, the learner has returned
        finally:
            ray.kill(self._sink)
        if self._error is not None and exc_type is None:
            raise self._error

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._deliver()
            except BaseException as error:  # the driver's log failed (a full disk): training goes on, the error is raised at the end
                self._error = error
                return

    def _deliver(self) -> None:
        try:
            records = ray.get(self._sink.take.remote())
        except ray.exceptions.ActorDiedError:  # killed, or its node lost: what it held is gone, the training is not
            records = []
        for metrics, env_steps in records:
            self.log(metrics, env_steps)
