"""IW-OPD as a method: the student's own continuations, sampled inside the step, trained by the importance-weighted
sampled-token policy gradient toward the teacher (:func:`jaxkd.losses.iw_opd`)."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_int, check_nonnegative, check_positive, check_temperature
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import learner_rollout
from jaxkd.methods.lm.tokens import LM_KEYS
from jaxkd.methods.registry import register

__all__ = ["iw_opd"]


@register(
    "iw_opd", inputs="tokens", example="prompt_length=3",
    paper="Xie et al., *On the Position Bias of On-Policy Distillation* (IW-OPD), 2026",
    losses=("iw_opd", "iw_opd_weights"),
    status="supported (student sampling inside the jitted step; TRL's IWOPDTrainer loss)",
)
def iw_opd(
    *,
    prompt_length: int = 16,
    temperature: float = 1.0,
    gamma: float = 0.5,
    epsilon: float = 1e-8,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "iw_opd",
) -> Method:
    """Importance-Weighted On-Policy Distillation on sequences the student samples in the step.

    Every row's first ``prompt_length`` tokens are continued by the participant in the ``student`` role at
    ``temperature`` (TRL samples and scores at the same temperature), and the loss is
    :func:`jaxkd.losses.iw_opd` on the generated tokens: ``−log q(x_t)·w_t·a_t`` with the advantage
    ``a_t = log p(x_t) − log q(x_t)`` (detached; the sampling policy is the current student, so TRL's
    rollout log-probabilities equal the student's) and the position weight
    ``w_t = 1 + γ·(1 − Σ_{s<t}|a_s| / Σ_s|a_s|)``, averaged over the generated tokens. ``γ = 0`` is the plain
    sampled-token reverse-KL policy gradient. TRL's ``IWOPDTrainer`` (``distillation_objective="iw_opd"``,
    fully on-policy, ``lmbda = 1``).

    ``student``/``teacher`` name the participants in the two roles: the ``student`` samples and learns, the
    ``teacher`` is a gradient-stopped target (``iw_opd(student="peer", teacher="student")`` teaches a peer).
    """
    check_roles(name, student, teacher)
    check_int("prompt_length", prompt_length, low=1)
    check_temperature("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_positive("epsilon", epsilon)

    def compute(inputs: LossInputs, rng):
        x, target_mask = learner_rollout(inputs, rng, prompt_length=prompt_length, temperature=temperature,
                                         top_k=top_k, top_p=top_p, eos_id=eos_id, method=name, learner=student)
        x = jax.lax.stop_gradient(x)
        s = apply_participant(inputs, student, x, train=True, method=name).logits
        t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        targets, _ = losses.next_token_targets(x[TOKENS], x[MASK])
        return losses.iw_opd(shift_logits(s), shift_logits(t), targets, target_mask, temperature=temperature,
                             gamma=gamma, epsilon=epsilon)

    return stateless_method(name, compute, weight=weight, participants=(teacher,), trained=(student,),
                            batch_keys=LM_KEYS)
