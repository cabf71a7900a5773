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
from jaxkd.methods import tgeo
from jaxkd.methods.divergences import ab, forward_kl, gjsd, jsd, reverse_kl, skl, sparse_kd, srkl, tvd
from jaxkd.methods.dual_head import dhkd, dho
from jaxkd.methods.fantastic_gains import kd_dp
from jaxkd.methods.logit import ce, kd
from jaxkd.methods.taid import taid
from jaxkd.methods.tgeo import tgeo_kd
from jaxkd.methods.spec import REGISTRY, parse, register

__all__ = [
    "ab",
    "forward_kl",
    "gjsd",
    "jsd",
    "reverse_kl",
    "skl",
    "sparse_kd",
    "srkl",
    "tvd",
    "REGISTRY",
    "LossAux",
    "LossInputs",
    "Method",
    "MethodVars",
    "StepInfo",
    "as_chain",
    "ce",
    "chain",
    "dhkd",
    "dho",
    "example_mask",
    "kd",
    "kd_dp",
    "parse",
    "register",
    "require",
    "require_teacher",
    "taid",
    "tgeo_kd",
]
