"""ScaLearn: a target task learned as a scaled sum of frozen source experts' representations.

Frohmann et al., "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale"
(Findings of ACL 2024); official code CPJKU/ScaLearn (``adapter-transformers/src/transformers/adapters/
modeling.py``: ``ScaLearn``, ``ScaLearnPlusPlus``, ``init_shared_parameters_scalearn``; ``configuration.py``:
the ``scalearn*`` configurations).

The paper combines, in every transformer layer, the outputs ``hᵢ`` of the frozen source tasks' adapters with
learned scaling coefficients, ``o = Σᵢ ωᵢ ⊙ hᵢ`` (plus the layer's residual), and trains only the ``ω`` and
the target task's head on the target's labels. Variants (official configurations):

* ``omega="vector"`` — ScaLearn: ``ωᵢ ∈ R^D``, one scale per source and hidden unit (the default
  ``scalearn_2_avg_d03``);
* ``omega="scalar"`` — ScaLearnUniform: ``ωᵢ ∈ R``, one scale per source (``scalearnUniform_2_avg_d03``).

ScaLearn++ / ScaLearnUniform++ share one set of ``ω`` across all layers instead of one per layer; jaxkd
combines the sources at a single point (below), where the two are the same model.

Initialization as the official ``avg`` init: ``ωᵢ ~ N(init_scale / N, 0.001²)`` with ``init_scale = 2``
(``omega_init_scale: 2.0``); dropout with rate 0.3 is applied to ``ω`` itself in training
(``dropout_ratio: 0.3``; rescaled by ``1/(1 − p)`` as ``torch.nn.Dropout`` does).

Not reproduced: the optional regularization ``λ Σᵢ (1 − mean_d ωᵢ,d)²`` (off in the default configurations) and
the ``take_mean`` / ``take_softmax`` ablations. The official GLUE runs use learning rate 6e-3, batch size 32
and 30 epochs, with every task's adapter as a source (the target's own included).

jaxkd's form (:func:`scalearn_model`): the sources are whole frozen expert models (any
:class:`~jaxkd.models.Model`); ``hᵢ`` is the feature they publish under one name (``"pooled"`` for the image
models), the combination ``o = Σᵢ ωᵢ ⊙ hᵢ`` is published as the feature ``"combined"``, and a linear head
``Dense(num_classes)`` on ``o`` gives the logits. The result is a :class:`~jaxkd.models.Model` that trains in
the ordinary step (``jaxkd.create(student=model, method=methods.ce(), ...)``): its parameters (what the
optimizer steps) are ``{"omega", "head"}``; the experts' variables travel in the non-parameter collection
``"sources"`` (``{"source_0": variables, ...}``), which the optimizer never sees and the step hands back
unchanged. The experts run in eval mode under ``stop_gradient``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.checks import check_choice, check_in_range, check_int, check_number
from jaxkd.models.base import Model, Outputs, get_feature

PyTree = Any
Array = jax.Array

#: The collection holding the frozen source experts' variables.
SOURCES = "sources"
OMEGA_SHAPES = ("vector", "scalar")


def scalearn_combine(omega: Array, features: Array) -> Array:
    """``Σᵢ ωᵢ ⊙ hᵢ``: ``omega`` ``[N, D]`` (or ``[N, 1]``), ``features`` the stacked ``[N, batch, ..., D]``."""
    omega = omega.reshape(omega.shape[0], *([1] * (features.ndim - 2)), omega.shape[-1])
    return jnp.sum(omega * features, axis=0)


class ScaLearnHead(nn.Module):
    """The trained part: the scaling coefficients ``omega`` and the target head.

    ``__call__(features [N, batch, ..., D], train)`` returns the logits ``[batch, ..., num_classes]`` and sows
    the combination as ``"combined"``.
    """

    num_sources: int
    num_classes: int
    omega_shape: str = "vector"
    init_scale: float = 2.0
    dropout: float = 0.3

    @nn.compact
    def __call__(self, features: Array, train: bool = False) -> Array:
        width = features.shape[-1] if self.omega_shape == "vector" else 1
        mean = self.init_scale / self.num_sources

        def init(rng, shape, dtype=jnp.float32):
            return mean + 0.001 * jax.random.normal(rng, shape, dtype)

        omega = self.param("omega", init, (self.num_sources, width))
        omega = nn.Dropout(self.dropout)(omega, deterministic=not train)
        combined = scalearn_combine(omega, features)
        self.sow("intermediates", "combined", combined)
        logits = nn.Dense(self.num_classes, name="head")(combined)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _source_features(models: Sequence[Model], variables: Mapping[str, PyTree], x: Any, feature: str) -> Array:
    """Each frozen source's feature ``feature`` on ``x`` (eval mode, no gradient), stacked ``[N, batch, ..., D]``."""
    hs = []
    for i, model in enumerate(models):
        out = model.apply(variables[f"source_{i}"], x, train=False)
        hs.append(jax.lax.stop_gradient(get_feature(out, feature, who=f"source {i} ({model.name})")))
    shapes = {tuple(h.shape) for h in hs}
    if len(shapes) > 1:
        raise ValueError(f"scalearn: the sources' feature {feature!r} must have one shape to be combined, got "
                         f"{[tuple(h.shape) for h in hs]}")
    if hs[0].ndim < 2:
        raise ValueError(f"scalearn: the sources' feature {feature!r} must be [batch, ..., D], got {hs[0].shape}")
    return jnp.stack([h.astype(jnp.result_type(*hs)) for h in hs])


def scalearn_model(source_models: Sequence[Model], source_variables: Sequence[PyTree], *, feature: str,
                   num_classes: int, omega: str = "vector", init_scale: float = 2.0, dropout: float = 0.3,
                   name: str = "scalearn") -> Model:
    """A :class:`~jaxkd.models.Model` computing ``head(Σᵢ ωᵢ ⊙ hᵢ(x))`` over frozen source experts.

    Args:
      source_models: the source experts (at least one); every one reads the same input ``x``.
      source_variables: their trained variables (``{"params": ..., "batch_stats": ...}``), one per model.
      feature: the feature every source publishes and ScaLearn combines (the same shape for all).
      num_classes: the target task's classes (the head's outputs).
      omega: ``"vector"`` (ScaLearn, ``ωᵢ ∈ R^D``) or ``"scalar"`` (ScaLearnUniform, ``ωᵢ ∈ R``).
      init_scale: ``ω``'s mean at initialization is ``init_scale / N`` (2.0 as the official configurations).
      dropout: dropout rate on ``ω`` in training (0.3 officially; 0 turns it off).
      name: the model's label.

    ``init(rng, x)`` returns ``{"params": {"omega", "head"}, "sources": {"source_i": variables}}`` (the
    sources' variables as given). Starting ``jaxkd.create`` from ``student_variables=model.init(rng, x)``
    computed outside ``jit`` keeps large experts out of the compiled initialization as constants.

    Raises:
      ValueError: no source, a different number of models and variables, an unknown ``omega``, a bad
        ``init_scale``/``dropout``/``num_classes``; when applied (first at ``jaxkd.create``): a source that
        does not publish ``feature`` (the message lists what it does publish), sources whose features differ
        in shape.
    """
    if isinstance(source_models, Model) or not isinstance(source_models, Sequence) or len(source_models) < 1:
        raise ValueError("scalearn needs at least one source model (a sequence of jaxkd Models), got "
                         f"{source_models!r}")
    if not all(isinstance(m, Model) for m in source_models):
        raise ValueError("scalearn: every source must be a jaxkd.models.Model, got "
                         f"{[type(m).__name__ for m in source_models]}")
    if isinstance(source_variables, Mapping) or len(source_variables) != len(source_models):
        raise ValueError(f"scalearn: give one variables tree per source model ({len(source_models)}), got "
                         f"{'a mapping' if isinstance(source_variables, Mapping) else len(source_variables)}")
    if not isinstance(feature, str) or not feature:
        raise ValueError(f"scalearn: feature must be a feature name, got {feature!r}")
    check_choice("omega", omega, OMEGA_SHAPES)
    check_int("num_classes", num_classes, low=1)
    check_number("init_scale", init_scale)
    check_in_range("dropout", dropout, 0.0, 1.0)
    if dropout >= 1.0:
        raise ValueError(f"dropout must be below 1, got dropout={dropout}")
    models = tuple(source_models)
    sources = {f"source_{i}": v for i, v in enumerate(source_variables)}
    head = ScaLearnHead(num_sources=len(models), num_classes=num_classes, omega_shape=omega,
                        init_scale=init_scale, dropout=dropout)

    def init(rng: Array, x: Any) -> PyTree:
        params = head.init({"params": rng, "dropout": rng}, _source_features(models, sources, x, feature))["params"]
        return {"params": params, SOURCES: sources}

    def apply(variables: PyTree, x: Any, *, train: bool, rngs: Mapping[str, Array] | None = None) -> Outputs:
        features = _source_features(models, variables[SOURCES], x, feature)
        logits, sown = head.apply({"params": variables["params"]}, features, train=train, rngs=dict(rngs or {}),
                                  mutable=["intermediates"])
        combined = sown["intermediates"]["combined"][-1]
        return Outputs(logits=logits, features={"combined": combined}, model_state={SOURCES: variables[SOURCES]})

    return Model(init=init, apply=apply, name=name, module=head)


def scalearn_omega(variables: PyTree) -> np.ndarray:
    """The learned scaling coefficients ``[N, D]`` (or ``[N, 1]``) of a ScaLearn model's variables."""
    return np.asarray(variables["params"]["omega"])


__all__ = ["OMEGA_SHAPES", "SOURCES", "ScaLearnHead", "scalearn_combine", "scalearn_model", "scalearn_omega"]
