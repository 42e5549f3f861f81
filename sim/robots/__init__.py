"""Robot models and their tasks. Importing this package registers the built-in robots."""

from sim.robots.base import PhysicsState, Task
from sim.robots.registry import get_task, register, robot_names
from sim.robots import ant, half_cheetah, pendulum, reacher  # noqa: F401  (registration)

__all__ = ["PhysicsState", "Task", "get_task", "register", "robot_names"]
