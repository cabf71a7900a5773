"""Merging and fusion in parameter space (model soups, task arithmetic, TIES, DARE, SLERP, FuseChat, learned merges).

Pure functions from parameter pytrees (a base and fine-tuned models with its structure) to one pytree.
"""

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
from jaxkd.merging.expert_merging import (chunk_plan, coefficients, expert_merging_model, expert_merging_participants,
                                          expert_merging_variables, layer_importance, merged_params)
from jaxkd.merging.fusechat import sce, variation_ratio, variation_ratio_weights
from jaxkd.merging.scalearn import ScaLearnHead, scalearn_combine, scalearn_model, scalearn_omega
from jaxkd.merging.slerp import slerp
from jaxkd.merging.twin_merging import (LowRank, TwinRouter, TwinVectors, train_twin_router, twin_apply,
                                        twin_compress, twin_merged_params, twin_router_features, twin_router_loss,
                                        twin_router_weights)

__all__ = ["check_count", "check_same_structure", "per_leaf_weights",
           "sce", "slerp", "variation_ratio", "variation_ratio_weights",
           "chunk_plan", "coefficients", "expert_merging_model", "expert_merging_participants",
           "expert_merging_variables", "layer_importance", "merged_params",
           "LowRank", "TwinRouter", "TwinVectors", "train_twin_router", "twin_apply", "twin_compress",
           "twin_merged_params", "twin_router_features", "twin_router_loss", "twin_router_weights",
           "ScaLearnHead", "scalearn_combine", "scalearn_model", "scalearn_omega",
           # task arithmetic family (jaxkd/merging/task_arithmetic.py, sparsify.py)
           "linear", "task_arithmetic", "ties", "dare", "breadcrumbs", "della", "generalized_task_arithmetic",
           "magnitude_mask", "random_mask", "outlier_mask", "della_keep_probabilities", "della_mask",
           "rescale_kept", "sparsify_delta", "model_key"]
