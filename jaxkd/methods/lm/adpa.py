"""ADPA as a method: advantage-guided distillation on student samples, from a preference-tuned teacher and its
reference."""

from __future__ import annotations

import jax

from jaxkd import losses
from jaxkd.checks import check_int
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import learner_rollout
from jaxkd.methods.registry import register
from jaxkd.methods.lm.tokens import LM_KEYS

__all__ = ["adpa"]


@register(
    "adpa", inputs="tokens", example="prompt_length=3",
    paper="Gao et al., *Advantage-Guided Distillation for Preference Alignment in Small Language Models*, ICLR 2025",
    losses=("adpa", "adpa_advantages"),
    status="supported (advantage from a preference-tuned teacher and its reference; on student samples)",
)
def adpa(
    *,
    student: str = "student",
    teacher: str = "teacher",
    reference: str = "reference",
    top_k: int | None = None,
    prompt_length: int = 16,
    sampling_temperature: float = 1.0,
    weight: Weight = 1.0,
    name: str = "adpa",
) -> Method:
    """ADPA: on the student's own continuations (sampled in the step), ``−Σ_v π_θ(v)·A(v)`` per generated
    token with the advantage ``A = log π_teacher − log π_reference`` of a preference-tuned teacher over its
    reference (:func:`jaxkd.losses.adpa`; ``top_k`` keeps the advantage at the teacher's top-k
    entries, official 50). The two teachers are participants ``teacher`` and ``reference`` of the train
    state. Combine with ``lm_ce`` and/or a KL term (DCKD) as the paper does.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the
    participant in the ``student`` role samples the continuations and is trained; the one in the ``teacher``
    role is a gradient-stopped target (``adpa(student="peer", teacher="student")`` teaches a peer)."""
    check_roles(name, student, teacher)
    check_int("prompt_length", prompt_length, low=1)
    if top_k is not None:
        check_int("top_k", top_k, low=1)

    def compute(inputs: LossInputs, rng):
        x, target_mask = learner_rollout(inputs, rng, prompt_length=prompt_length, temperature=sampling_temperature,
                                          top_k=None, top_p=None, eos_id=None, method=name, learner=student)
        s = apply_participant(inputs, student, x, train=True, method=name).logits
        t = jax.lax.stop_gradient(apply_participant(inputs, teacher, x, train=False, method=name).logits)
        r = jax.lax.stop_gradient(apply_participant(inputs, reference, x, train=False, method=name).logits)
        return losses.adpa(shift_logits(s), shift_logits(t), shift_logits(r), top_k=top_k, mask=target_mask)

    return stateless_method(name, compute, weight=weight, participants=(teacher, reference), trained=(student,),
                            batch_keys=LM_KEYS)
