"""Pure, jittable distillation objectives: functions of arrays, no state, no config objects.

Each loss is written once, per example, and made public by
:func:`jaxkd.losses.core.per_example_loss` (``mask``, ``weights``, ``reduction``); see
:mod:`jaxkd.losses.core` for the conventions every loss shares (at least float32 inside, ``-inf`` =
excluded class, NaN propagates, one reduction) and :mod:`jaxkd.checks` for the argument checks.

The folders are the families of the method table: :mod:`~jaxkd.losses.logit` (a learner's logits against a
target's), :mod:`~jaxkd.losses.feature` (intermediate features), :mod:`~jaxkd.losses.lm` (language-model
objectives) and :mod:`~jaxkd.losses.fusion` (several models into one target). Every public name of every
module (its ``__all__``) is exported here, so a new loss is one new file, ``jaxkd/losses/<family>/<method>.py``,
named after the method it implements.

What is here: objectives, the pieces an objective is built from (``dkd_terms``, ``crd_scores``,
``sinkhorn_plan``), and the helpers a new loss is written with. What a method carries across steps (TAID's
``t``, DistiLLM's schedule, CRD's memory-bank update) and what is computed once on the host before training
(ND's class means, LELP's projections) lives with its method in :mod:`jaxkd.methods`.
"""

from jaxkd._packages import export_modules, renamed_attributes

#: The family folders, in the order the registry (and the README's method table) lists them.
FAMILIES = ("logit", "feature", "lm", "fusion")
from jaxkd.losses.core import (
    combine_masks,
    flatten_features,
    is_masked,
    l2_normalize,
    log_softmax,
    per_example_loss,
    reduce_loss,
    to_float,
)

# Besides the objectives: the helpers a new loss is written with (the shared reduction, float32 accumulation,
# -inf-safe masks, feature flattening and normalization), so an extension needs only ``jaxkd.losses``.
__all__ = ["combine_masks", "flatten_features", "is_masked", "l2_normalize", "log_softmax", "per_example_loss",
           "reduce_loss", "to_float"]
__all__ += export_modules(globals(), skip={"core"}, families=FAMILIES, first=["classification", "divergences", "sparse"])
__all__.sort()


#: Former names of losses renamed after their method (``nd_loss`` -> ``nd``).
_RENAMED = {"nd_loss": "nd", "ofa_loss": "ofa", "swing_kd": "swing", "adpa_loss": "adpa", "alm_loss": "alm",
            "fusellm_loss": "fusellm", "minillm_loss": "minillm", "infigfusion_gld": "infigfusion",
            # "normalizer" is a mean's denominator everywhere; CRD's Z is the NCE partition constant.
            "crd_normalizer": "crd_partition_constant"}

#: Names that moved next to their method (state, schedules, host precomputes) or into :mod:`jaxkd.checks`.
_MOVED = {
    **dict.fromkeys(("TAIDState", "taid_init_state", "taid_update", "DistiLLMSchedule", "DISTILLM_DATASET",
                     "DISTILLM_GENERATE", "DISTILLM_REPLAY", "distillm_schedule_init", "distillm_schedule_update",
                     "distillm_sampling_thresholds", "distillm_data_source", "distillm_use_student_output",
                     "crd_memory_update", "class_means", "lelp_projections", "lelp_projections_from_moments"),
                    "jaxkd.methods"),
    "check_teacher_weights": "jaxkd.checks",
}

__getattr__ = renamed_attributes(globals(), _RENAMED, _MOVED)
