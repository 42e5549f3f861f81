"""Recording one episode from a robot's control loop, step by step, into a schema-v1 Episode."""

from __future__ import annotations

import numpy as np

from sim.episode import Episode


class EpisodeRecorder:
    """Collects observation/action/reward/flags/timestamps of one episode at a time.

    ``reset(obs, t)`` starts an episode; ``step(...)`` appends one control step;
    ``finish()`` returns the validated :class:`Episode` and clears the buffers (also when it raises).
    Extras given at reset and every step have T+1 rows; extras given only at steps have T rows.
    """

    def __init__(self, *, robot_id: str, robot_model: str, source: str = "real", hardware: dict | None = None, **metadata):
        self.robot_id, self.robot_model, self.source = robot_id, robot_model, source
        self.hardware = hardware
        self.metadata = metadata
        self._started = False

    def reset(self, observation: np.ndarray, timestamp: float, extras: dict[str, np.ndarray] | None = None) -> None:
        """Start an episode at ``observation`` (obs_dim,) seen at ``timestamp`` seconds."""
        self._obs = [_reading("observation", observation)]
        self._time = [float(timestamp)]
        self._action, self._reward, self._term, self._trunc = [], [], [], []
        self._extras = {k: [np.array(v)] for k, v in (extras or {}).items()}
        self._started = True

    def step(
        self,
        action: np.ndarray,
        reward: float,
        observation: np.ndarray,
        terminated: bool,
        truncated: bool,
        timestamp: float,
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Record that ``action`` (act_dim,) led to ``observation`` (obs_dim,) and ``reward`` at ``timestamp``."""
        if not self._started:
            raise RuntimeError("call reset(observation, timestamp) before step()")
        self._action.append(_reading("action", action))
        self._reward.append(float(reward))
        self._obs.append(_reading("observation", observation))
        self._term.append(bool(terminated))
        self._trunc.append(bool(truncated))
        self._time.append(float(timestamp))
        for k, v in (extras or {}).items():
            self._extras.setdefault(k, []).append(np.array(v))

    def truncate(self) -> None:
        """Mark the last recorded step as where the episode was cut (an operator, a clock that stepped back)."""
        if not self.num_steps:
            raise RuntimeError("no steps recorded since reset(); nothing to truncate")
        self._trunc[-1] = True

    def terminate(self) -> None:
        """Mark the last recorded step as the true end of the task (a fall whose reading was not recorded: run_episode)."""
        if not self.num_steps:
            raise RuntimeError("no steps recorded since reset(); nothing to terminate")
        self._term[-1] = True

    @property
    def last_timestamp(self) -> float:
        """The timestamp recorded last (the reset's before any step)."""
        if not self._started:
            raise RuntimeError("call reset(observation, timestamp) first")
        return self._time[-1]

    @property
    def num_steps(self) -> int:
        return len(self._action) if self._started else 0

    @property
    def done(self) -> bool:
        return self._started and bool(self._action) and (self._term[-1] or self._trunc[-1])

    def finish(self, policy_version: str = "none", **metadata) -> Episode:
        """The recorded episode (validated); raises EpisodeValidationError naming a bad field (a NaN, say), or ValueError
        for steps of other shapes. Either way the recorder is cleared: a refused episode is dropped, and the next
        ``reset()`` starts clean (one that kept it made every later episode of a control loop fail the same way)."""
        if not self._started or not self._action:
            raise RuntimeError("no steps recorded since reset(); nothing to finish")
        meta = {**self.metadata, **metadata}
        if self.hardware is not None:
            meta.setdefault("hardware", self.hardware)
        try:
            return Episode.create(
                observation=np.stack(self._obs),
                action=np.stack(self._action),
                reward=np.asarray(self._reward, np.float32),
                terminated=np.asarray(self._term),
                truncated=np.asarray(self._trunc),
                timestamp=np.asarray(self._time, np.float64),
                robot_id=self.robot_id,
                robot_model=self.robot_model,
                source=self.source,
                policy_version=policy_version,
                extras={k: np.stack(v) for k, v in self._extras.items()} or None,
                **meta,
            )
        finally:
            self._started = False


def _reading(name: str, value) -> np.ndarray:
    """One step's ``observation`` or ``action`` as given (``Episode.create`` casts the episode to float32 at ``finish``,
    refusing a cast that changes the values: integer ticks over 2^24, say); a dict is refused here, naming the fix."""
    if isinstance(value, dict):
        raise TypeError(f"{name} is a dict ({', '.join(map(str, list(value)[:5]))}): the schema's {name} is one vector of numbers; "
                        "concatenate its fields in a fixed order (and name them in the episode's 'names', schema 1.1)")  # fmt: skip
    return np.array(value)  # a copy: a driver that updates one buffer in place (MuJoCo's data.qpos) recorded its last reading at every step
