"""Distillation methods as composable transforms (see :mod:`jaxkd.methods.base`)."""

from jaxkd.methods.base import (
    LossAux,
    LossInputs,
    Method,
    MethodVars,
    StepInfo,
    as_chain,
    chain,
    example_mask,
    require,
    require_teacher,
)
from jaxkd.methods.logit import ce, kd
from jaxkd.methods.spec import REGISTRY, parse, register

__all__ = [
    "REGISTRY",
    "LossAux",
    "LossInputs",
    "Method",
    "MethodVars",
    "StepInfo",
    "as_chain",
    "ce",
    "chain",
    "example_mask",
    "kd",
    "parse",
    "register",
    "require",
    "require_teacher",
]
