"""Distillation methods as composable transforms (see :mod:`jaxkd.methods.base`).

The folders are the families, as in :mod:`jaxkd.losses`: :mod:`~jaxkd.methods.logit`,
:mod:`~jaxkd.methods.feature`, :mod:`~jaxkd.methods.lm`, :mod:`~jaxkd.methods.fusion`, :mod:`~jaxkd.methods.merge` and the batch
transforms of :mod:`~jaxkd.methods.augment`. Every module that
defines methods registers them (:func:`register`) and lists them in its ``__all__``; all of them are imported
and exported here, so a new method is its own file ``jaxkd/methods/<family>/<method>.py`` (next to its loss,
``jaxkd/losses/<family>/<method>.py``) with one registration line — no list to edit.

What is here: the method protocol and composition (:mod:`jaxkd.methods.base`), every registered factory, the
helpers a new method is written with (features by name, connectors sized from shapes), and each method's
state types and host-side precomputes (``teacher_class_means``, ``cache_teacher_log_probs``). The Flax modules
and helpers one method uses internally stay in its module.
"""

from jaxkd._packages import export_modules, renamed_attributes

#: The family folders, in the order the registry (and the README's method table) lists them.
FAMILIES = ("logit", "feature", "lm", "fusion", "merge", "augment")
from jaxkd.methods.base import (
    LossAux,
    LossInputs,
    Method,
    MethodVars,
    Needs,
    StepInfo,
    Weight,
    after,
    as_chain,
    chain,
    logit_method,
    logit_roles_method,
    multiply_weights,
    require,
    stateless_method,
    until,
)
from jaxkd.methods.registry import ALIASES, LEADING_METHODS, REGISTRY, method_table, register
from jaxkd.methods.spec import parse

__all__ = [
    "REGISTRY",
    "LossAux",
    "LossInputs",
    "Method",
    "MethodVars",
    "Needs",
    "StepInfo",
    "Weight",
    "after",
    "as_chain",
    "chain",
    "logit_method",
    "logit_roles_method",
    "method_table",
    "multiply_weights",
    "parse",
    "register",
    "require",
    "stateless_method",
    "until",
]

# The building blocks first, so the registry (and the README's method table) lists them first.
__all__ += export_modules(
    globals(), skip={"base", "registry", "spec", "heads"}, families=FAMILIES,
    first=LEADING_METHODS,
)
__all__.sort()


#: Former factory names (the registry's :data:`~jaxkd.methods.registry.ALIASES`, plus the AB connector).
_RENAMED = {**ALIASES, "abound_connector": "activation_boundary_connector"}

#: The batch key names live in :mod:`jaxkd.batch` (``MASK``, ``LABELED``).
_MOVED_KEYS = {"MASK_KEY": "MASK", "LABELED_KEY": "LABELED"}


def __getattr__(name: str):
    if name in _MOVED_KEYS:
        import warnings

        from jaxkd import batch

        new = _MOVED_KEYS[name]
        warnings.warn(f"jaxkd.methods.{name} is deprecated: use jaxkd.batch.{new}", FutureWarning, stacklevel=2)
        return getattr(batch, new)
    return _renamed(name)


_renamed = renamed_attributes(globals(), _RENAMED)
