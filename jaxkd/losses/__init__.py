"""Pure, jittable distillation objectives: functions of arrays, no state, no config objects.

Every loss computes in float32, treats ``-inf`` logits as excluded entries (zero mass, zero gradient),
takes explicit ``mask``/``weights``/``reduction`` arguments, and raises ``ValueError`` for bad
hyper-parameters or mismatched shapes. See :mod:`jaxkd.losses._core` for the shared conventions.
"""

from jaxkd.losses._core import log_softmax, reduce_loss
from jaxkd.losses.classification import cross_entropy, kd
from jaxkd.losses.divergences import (
    alpha_beta_divergence,
    alpha_beta_divergence_per_example,
    forward_kl,
    forward_kl_per_example,
    generalized_jsd,
    generalized_jsd_per_example,
    js_divergence,
    js_divergence_per_example,
    kl_divergence,
    kl_per_example,
    reverse_kl,
    reverse_kl_per_example,
    skew_kl,
    skew_kl_per_example,
    skew_reverse_kl,
    skew_reverse_kl_per_example,
    total_variation,
    total_variation_per_example,
)
from jaxkd.losses.fantastic_gains import data_partitioned_kd, teacher_is_more_confident
from jaxkd.losses.sparse import sparse_forward_kl, sparse_forward_kl_per_example, topk_teacher
from jaxkd.losses.taid import taid, taid_update
from jaxkd.losses.tgeo import fused_kd_ce, fusion_inputs

__all__ = [
    "alpha_beta_divergence",
    "alpha_beta_divergence_per_example",
    "cross_entropy",
    "data_partitioned_kd",
    "forward_kl",
    "forward_kl_per_example",
    "fused_kd_ce",
    "fusion_inputs",
    "generalized_jsd",
    "generalized_jsd_per_example",
    "js_divergence",
    "js_divergence_per_example",
    "kd",
    "kl_divergence",
    "kl_per_example",
    "log_softmax",
    "reduce_loss",
    "reverse_kl",
    "reverse_kl_per_example",
    "skew_kl",
    "skew_kl_per_example",
    "skew_reverse_kl",
    "skew_reverse_kl_per_example",
    "sparse_forward_kl",
    "sparse_forward_kl_per_example",
    "taid",
    "taid_update",
    "teacher_is_more_confident",
    "topk_teacher",
    "total_variation",
    "total_variation_per_example",
]
