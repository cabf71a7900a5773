"""Merging and fusion in parameter space: one model from several fine-tuned ones, by arithmetic on their weights.

Pure, jittable functions from parameter pytrees (a ``base`` and ``models`` with its structure) to one pytree,
computed in float32 and returned in ``base``'s dtypes and shardings (guide: ``docs/merging.md``):

* :mod:`~jaxkd.merging.task_arithmetic` — ``linear`` (model soups), ``task_arithmetic``, ``ties``, ``dare``,
  ``breadcrumbs``, ``della``: one generalized task arithmetic, as mergekit computes it
  (:mod:`~jaxkd.merging.sparsify`: their trims, drops and rescales; :mod:`~jaxkd.merging.consensus`: TIES'
  sign election).
* :mod:`~jaxkd.merging.slerp` — spherical interpolation of two models.
* :mod:`~jaxkd.merging.fusechat` — FuseChat's VaRM (``variation_ratio``) and SCE (``sce``).

Learned merges (they train a few parameters on calibration or validation data):

* :mod:`~jaxkd.merging.expert_merging` — Expert Merging(++): layer-wise (chunked) coefficients as the only
  trained parameters of a model in the ordinary train state, fitted by the ``expert_merging`` method.
* :mod:`~jaxkd.merging.twin_merging` — Twin-Merging: a shared merge plus SVD-compressed exclusive knowledge,
  mixed per input by a router.
* :mod:`~jaxkd.merging.scalearn` — ScaLearn: learned scaling of frozen experts' representations for a target task.

:mod:`~jaxkd.merging.trees` holds the checks every merge shares (first differing path, both shapes).
"""

from jaxkd.merging.expert_merging import (
    chunk_plan,
    coefficients,
    expert_merging_model,
    expert_merging_participants,
    expert_merging_variables,
    layer_importance,
    merged_params,
)
from jaxkd.merging.fusechat import sce, variation_ratio, variation_ratio_weights
from jaxkd.merging.scalearn import ScaLearnHead, scalearn_combine, scalearn_model, scalearn_omega
from jaxkd.merging.slerp import slerp
from jaxkd.merging.sparsify import (
    della_keep_probabilities,
    della_mask,
    magnitude_mask,
    model_key,
    outlier_mask,
    random_mask,
    rescale_kept,
    sparsify_delta,
)
from jaxkd.merging.task_arithmetic import (
    breadcrumbs,
    dare,
    della,
    generalized_task_arithmetic,
    linear,
    task_arithmetic,
    ties,
)
from jaxkd.merging.trees import check_count, check_same_structure, per_leaf_weights
from jaxkd.merging.twin_merging import (
    LowRank,
    TwinRouter,
    TwinVectors,
    train_twin_router,
    twin_apply,
    twin_compress,
    twin_merged_params,
    twin_router_features,
    twin_router_loss,
    twin_router_weights,
)

__all__ = [
    # the task-arithmetic family and its pieces
    "linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "della", "generalized_task_arithmetic",
    "magnitude_mask", "random_mask", "outlier_mask", "della_keep_probabilities", "della_mask", "rescale_kept",
    "sparsify_delta", "model_key",
    # SLERP and FuseChat
    "slerp", "variation_ratio", "variation_ratio_weights", "sce",
    # learned merges
    "expert_merging_model", "expert_merging_participants", "expert_merging_variables", "merged_params",
    "coefficients", "layer_importance", "chunk_plan",
    "twin_compress", "twin_merged_params", "twin_apply", "TwinVectors", "LowRank", "TwinRouter",
    "twin_router_features", "twin_router_weights", "twin_router_loss", "train_twin_router",
    "scalearn_model", "ScaLearnHead", "scalearn_combine", "scalearn_omega",
    # shared checks
    "check_count", "check_same_structure", "per_leaf_weights",
]
