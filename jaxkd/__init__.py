"""jaxkd: knowledge distillation in JAX/Flax.

* :mod:`jaxkd.batch` — the batch schema: entry names, token masks, global counts.
* :mod:`jaxkd.losses` — pure, jittable objectives over arrays (they never see a batch).
* :mod:`jaxkd.methods` — methods as composable transforms (``ce() + kd(temperature=4)``).
* :mod:`jaxkd.train_state`, :mod:`jaxkd.steps` — the teacher/student state and its jitted steps.
* :mod:`jaxkd.eval_metrics` — what an evaluation measures (top-1, agreement, teacher–student KL, bits per byte).
* :mod:`jaxkd.inference` — a model mapped over a dataset (every offline pass: caches, class means, scores).
* :mod:`jaxkd.merging` — merges in parameter space (soups, task arithmetic, TIES, DARE, SLERP, FuseChat, learned).
* :mod:`jaxkd.checks` — the argument checks every part shares.
* :mod:`jaxkd.precision` — mixed-precision policies of trained participants (``policy("bfloat16")``).
* :mod:`jaxkd.sharding`, :mod:`jaxkd.checkpoint`, :mod:`jaxkd.data`, :mod:`jaxkd.models`.
"""

from jaxkd import batch, checks, eval_metrics, inference, losses, merging, methods, precision
from jaxkd.participants import Participant
from jaxkd.steps import NonFiniteError, StepFailedError, evaluate, make_eval_step, make_train_step
from jaxkd.train_state import TrainState, create

__version__ = "0.1.0"

__all__ = [
    "NonFiniteError",
    "Participant",
    "StepFailedError",
    "TrainState",
    "batch",
    "checks",
    "create",
    "eval_metrics",
    "evaluate",
    "inference",
    "losses",
    "make_eval_step",
    "make_train_step",
    "merging",
    "methods",
    "precision",
]
