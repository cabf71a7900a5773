"""jaxkd: knowledge distillation in JAX/Flax.

* :mod:`jaxkd.losses` — pure, jittable objectives over arrays.
* :mod:`jaxkd.methods` — methods as composable transforms (``ce() + kd(temperature=4)``).
* :mod:`jaxkd.train_state`, :mod:`jaxkd.steps` — the teacher/student state and its jitted steps.
* :mod:`jaxkd.checks` — the argument checks every part shares.
* :mod:`jaxkd.sharding`, :mod:`jaxkd.checkpoint`, :mod:`jaxkd.data`, :mod:`jaxkd.models`.
"""

from jaxkd import checks, losses, methods
from jaxkd.participants import Participant
from jaxkd.steps import NonFiniteError, StepFailedError, evaluate, make_eval_step, make_train_step
from jaxkd.train_state import TrainState, create

__version__ = "0.1.0"

__all__ = [
    "NonFiniteError",
    "Participant",
    "StepFailedError",
    "TrainState",
    "checks",
    "create",
    "evaluate",
    "losses",
    "make_eval_step",
    "make_train_step",
    "methods",
]
