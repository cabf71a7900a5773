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
from jaxkd.methods.logit_methods import bdkd, dist, dkd, kd_ls, nkd, pld, sinkd, swing, warmup_schedule
from jaxkd.methods.fantastic_gains import kd_dp
from jaxkd.methods.logit import ce, kd
from jaxkd.methods.taid import taid
from jaxkd.methods.tgeo import tgeo_kd
from jaxkd.methods.spec import REGISTRY, parse, register

__all__ = [
    "LossAux",
    "LossInputs",
    "Method",
    "MethodVars",
    "REGISTRY",
    "StepInfo",
    "ab",
    "as_chain",
    "bdkd",
    "ce",
    "chain",
    "dhkd",
    "dho",
    "dist",
    "dkd",
    "example_mask",
    "forward_kl",
    "gjsd",
    "jsd",
    "kd",
    "kd_dp",
    "kd_ls",
    "nkd",
    "parse",
    "pld",
    "register",
    "require",
    "require_teacher",
    "reverse_kl",
    "sinkd",
    "skl",
    "sparse_kd",
    "srkl",
    "swing",
    "taid",
    "tgeo_kd",
    "tvd",
    "warmup_schedule",
]
