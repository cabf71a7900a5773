"""TRG: token-level relationship graph distillation (local graph, global InfoNCE, contextual terms)."""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_int, check_nonnegative, check_positive, check_temperature
from jaxkd.methods.base import LossAux, LossInputs, Method, MethodVars, Needs, Weight
from jaxkd.methods.feature.connectors import LinearConnector
from jaxkd.methods.features import module_apply, module_init, student_feature, teacher_feature
from jaxkd.methods.registry import register

__all__ = ["trg"]

Temperature = Union[float, Callable[[jax.Array], jax.Array]]


@register(
    "trg", inputs="feature_maps",
    paper="Zhang, Liu & He, *Knowledge Distillation via Token-level Relationship Graph*, arXiv 2023",
    losses=("trg_local", "trg_global", "trg_contextual"),
)
def trg(
    *,
    student_feature_name: str = "stage3",
    teacher_feature_name: str = "stage3",
    patch_size: int = 1,
    tokens_per_example: int | None = None,
    contextual_weight: float = 1.0,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
    k: int = 8,
    sigma: float = 1.0,
    temperature: Temperature = 0.1,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "trg",
) -> Method:
    """TRG (Zhang, Liu & He, 2023): ``α L_inner + β L_local + γ L_global`` over tokens of a feature
    (:func:`jaxkd.losses.trg_contextual`, :func:`~jaxkd.losses.trg_local`, :func:`~jaxkd.losses.trg_global`);
    add ``ce + kd`` for the paper's ``L_logit``.

    Tokens: ViT-style ``[B, N, D]`` features as they are, NHWC maps cut into ``patch_size × patch_size``
    patches (:func:`jaxkd.losses.patch_tokens`; the paper tokenizes a CNN's penultimate map). Student and
    teacher must give the same number of tokens. ``tokens_per_example`` samples that many token positions
    per example with the step's rng (the paper's random sampling to keep the graph small; ``None``: all).
    A trainable linear projection maps student tokens to the teacher's width for ``L_global`` (the local
    and contextual terms compare relations in each network's own space). ``temperature`` is ``τ_g`` or a
    schedule ``step -> τ_g`` (the paper's dynamic temperature, e.g. ``optax.linear_schedule(0.5, 0.05, n)``).

    Defaults (``α = β = γ = 1``, ``k = 8``, ``σ = 1``, ``τ_g = 0.1``) are not from published code (none was
    found); the paper tunes them. Metrics: ``contextual``, ``local``, ``global``.
    """
    patch_size = check_int("patch_size", patch_size, low=1)
    if tokens_per_example is not None:
        tokens_per_example = check_int("tokens_per_example", tokens_per_example, low=1)
    for arg, value in (("contextual_weight", contextual_weight), ("local_weight", local_weight),
                       ("global_weight", global_weight)):
        check_nonnegative(arg, value)
    k = check_int("k", k, low=1)
    check_positive("sigma", sigma)
    if not callable(temperature):
        check_temperature("temperature", temperature)
    if student == teacher:
        raise ValueError(f"{name}: the student and the teacher must be different participants, both are {student!r}")

    def to_tokens(x):
        if isinstance(x, jax.ShapeDtypeStruct):  # init sees abstract outputs
            return jax.eval_shape(lambda a: losses.patch_tokens(a, patch_size), x)
        return losses.patch_tokens(x, patch_size)

    def tokens(inputs):
        s = to_tokens(student_feature(inputs, student_feature_name, method=name, participant=student))
        t = to_tokens(teacher_feature(inputs, teacher_feature_name, method=name, participant=teacher))
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"{name}: the student's feature {student_feature_name!r} gives tokens {tuple(s.shape)} and the "
                f"teacher's {teacher_feature_name!r} gives {tuple(t.shape)}; TRG needs the same number of tokens "
                "(pick features of the same resolution or another patch_size)"
            )
        return s, t

    def init(rng, inputs: LossInputs) -> MethodVars:
        s, t = tokens(inputs)
        return module_init(LinearConnector(t.shape[-1]), rng, s)

    def loss(vars: MethodVars, inputs: LossInputs, rng):
        s, t = tokens(inputs)
        if tokens_per_example is not None and tokens_per_example < s.shape[1]:
            keys = jax.random.split(rng, s.shape[0])
            idx = jax.vmap(lambda r: jax.random.permutation(r, s.shape[1])[:tokens_per_example])(keys)
            s = jnp.take_along_axis(s, idx[:, :, None], axis=1)
            t = jnp.take_along_axis(t, idx[:, :, None], axis=1)
        mask = inputs.example_mask
        projected, state = module_apply(LinearConnector(t.shape[-1]), vars, s)
        tau = temperature(inputs.step) if callable(temperature) else temperature
        terms = {
            "contextual": losses.trg_contextual(s, t, mask=mask),
            "local": losses.trg_local(s, t, k=k, sigma=sigma, mask=mask),
            "global": losses.trg_global(projected, t, temperature=tau, mask=mask),
        }
        terms = {key: jnp.asarray(v, jnp.float32) for key, v in terms.items()}
        total = (contextual_weight * terms["contextual"] + local_weight * terms["local"]
                 + global_weight * terms["global"])
        return total, LossAux(terms, state)

    return Method(name=name, loss=loss, init=init, weight=weight, needs=Needs(participants=(student, teacher)))
