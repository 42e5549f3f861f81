"""A learner's log in another process reaches the driver's log while it trains, all of it and in order by the end."""

from __future__ import annotations

import pytest

from fleet.pipeline.remote_log import LogStream


def _signal(ray):
    @ray.remote(num_cpus=0)
    class Signal:
        def __init__(self):
            self.on = False

        def set(self):
            self.on = True

        def is_set(self):
            return self.on

    return Signal.remote()


def test_records_reach_the_driver_while_the_learner_still_runs(local_ray):
    ray = local_ray
    seen = _signal(ray)

    @ray.remote(num_cpus=0)
    def learner(log, seen) -> bool:
        import time

        log({"loss": 1.5}, 10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # it goes on training until the driver has shown its first record
            if ray.get(seen.is_set.remote()):
                return True
            time.sleep(0.05)
        return False

    logged = []

    def log(metrics, env_steps):
        logged.append((metrics, env_steps))
        ray.get(seen.set.remote())

    with LogStream(log, poll_s=0.05) as remote_log:
        shown_while_running = ray.get(learner.remote(remote_log, seen))
    assert shown_while_running and logged == [({"loss": 1.5}, 10)]


def test_every_record_reaches_the_driver_in_order_when_the_block_ends(local_ray):
    ray = local_ray

    @ray.remote(num_cpus=0)
    def learner(log) -> None:
        for i in range(40):
            log({"step": i, "q": float(i) / 2}, 100 * i)

    logged = []
    with LogStream(lambda m, n: logged.append((m, n)), poll_s=3600) as remote_log:  # no poll meanwhile
        ray.get(learner.remote(remote_log))
        assert logged == []
    assert logged == [({"step": float(i), "q": i / 2}, 100 * i) for i in range(40)]


def test_a_failing_learner_still_delivers_its_log_and_a_failing_log_is_raised_after_training(local_ray):
    ray = local_ray

    @ray.remote(num_cpus=0, max_retries=0)
    def learner(log, fail: bool) -> str:
        log({"loss": 1.0}, 1)
        if fail:
            raise RuntimeError("diverged")
        return "trained"

    logged = []
    with pytest.raises(ray.exceptions.RayTaskError, match="diverged"):
        with LogStream(lambda m, n: logged.append(n), poll_s=3600) as remote_log:
            ray.get(learner.remote(remote_log, True))
    assert logged == [1]

    def full_disk(metrics, env_steps):
        raise OSError("No space left on device")

    done = []
    with pytest.raises(OSError, match="No space left"):
        with LogStream(full_disk, poll_s=0.05) as remote_log:
            done.append(ray.get(learner.remote(remote_log, False)))
    assert done == ["trained"]  # the training itself was not cut short


def test_no_driver_log_means_no_remote_log():
    with LogStream(None) as remote_log:
        assert remote_log is None


def test_a_lost_sink_ends_the_log_never_the_training(local_ray):
    """A learner whose log sink is gone (the driver's node lost) once raised ActorDiedError from its log call, which no
    task retry covers: the run died with its training. Now the log stops and the training goes on."""
    ray = local_ray

    @ray.remote(num_cpus=0, max_retries=0)
    def learner(log) -> str:
        log({"loss": 1.0}, 1)
        ray.kill(log.sink)
        for step in range(2, 5):
            log({"loss": 1.0 / step}, step)
        return "trained"

    logged = []
    with LogStream(lambda m, n: logged.append(n), poll_s=3600) as remote_log:
        assert ray.get(learner.remote(remote_log)) == "trained"
    assert logged == []  # what the sink held went with it; nothing is logged twice or raised at the end
