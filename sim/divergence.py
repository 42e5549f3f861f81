"""Telling a diverged MuJoCo world from a valid one, in the output of ``mujoco.rollout``.

MuJoCo checks qpos, qvel and qacc at every step; a value it calls bad (NaN, Inf, or beyond
``mjMAXVAL``) raises its warning "the simulation is unstable" and, unless ``mjDSBL_AUTORESET`` is
set, resets the world to ``qpos0``: a blow-up then came back as a finite state, a jump back to the
start pose, and was kept as valid data. :func:`without_autoreset` sets that flag on the varied models
(:meth:`sim.variation.VariationProfile.apply`), so a bad value stays where a check sees it; the flag
changes nothing else (MuJoCo reads it only in those checks), so valid trajectories are bit-identical.

``mujoco.rollout`` clears a world's warnings when it starts it, and after any warning stops stepping
that world and repeats its last state for the remaining steps: its time stands still.
:func:`bad_steps` reads both marks.
"""

from __future__ import annotations

import mujoco
import numpy as np

MAX_VALUE = mujoco.mjMAXVAL  # what MuJoCo's own checks (mj_checkPos, mj_checkVel, mj_checkAcc) call too big


def without_autoreset(model: mujoco.MjModel) -> mujoco.MjModel:
    """``model`` with MuJoCo's automatic reset on bad values turned off (in place); returns it."""
    model.opt.disableflags |= int(mujoco.mjtDisableBit.mjDSBL_AUTORESET)
    return model


def bad_steps(states: np.ndarray, nq: int, nv: int) -> np.ndarray:
    """(N, S) bool, True at each step of rollout output ``states`` (N, S, nstate; the mjSTATE_FULLPHYSICS layout: time,
    qpos, qvel, ...) that diverged: its qpos or qvel holds a value MuJoCo calls bad, or the next step's time did not
    advance (MuJoCo warned during this step and the rollout stopped the world). With auto-reset on, a warning in a
    world's last step could still hide behind a reset state: run on models from :func:`without_autoreset`."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(states[:, :, 1 : 1 + nq + nv]) <= MAX_VALUE).all(axis=2)  # NaN compares False
    time = states[:, :, 0]
    bad[:, :-1] |= time[:, 1:] <= time[:, :-1]
    return bad


def diverged_steps(states: np.ndarray, nq: int, nv: int) -> np.ndarray:
    """(N, S) bool, True from each world's first diverged step (:func:`bad_steps`) on."""
    return np.logical_or.accumulate(bad_steps(states, nq, nv), axis=1)
