"""Sequence-level KD as a method: the student trained on the teacher's continuations of the batch's prompts,
generated inside the compiled train step (:mod:`jaxkd.methods.lm.rollout`)."""

from __future__ import annotations

from jaxkd import losses
from jaxkd.batch import MASK, TOKENS
from jaxkd.checks import check_int, check_nonnegative
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods.base import LossInputs, Method, Weight, check_roles, stateless_method
from jaxkd.methods.features import apply_participant
from jaxkd.methods.lm.rollout import generate_continuations, generated_target_mask
from jaxkd.methods.lm.tokens import LM_KEYS
from jaxkd.methods.registry import register

__all__ = ["seqkd"]


@register(
    "seqkd", inputs="tokens", example="prompt_length=3",
    paper="Kim & Rush, *Sequence-Level Knowledge Distillation*, EMNLP 2016",
    losses=("cross_entropy",),
    status="supported (teacher sequences generated inside the step)",
)
def seqkd(
    *,
    prompt_length: int = 16,
    sampling_temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    student: str = "student",
    teacher: str = "teacher",
    weight: Weight = 1.0,
    name: str = "seqkd",
) -> Method:
    """Sequence-level KD: the student's next-token cross-entropy on the *teacher's* continuations of the
    batch's prompts (its first ``prompt_length`` tokens), generated inside the step — greedy by default
    (``sampling_temperature=0``; Kim & Rush use beam search, which a fixed-shape sampler replaces by its
    mode-seeking greedy limit). The loss counts the generated tokens only.

    ``student``/``teacher`` name the participants in the two roles, as in :func:`~jaxkd.methods.kd`: the one
    in the ``teacher`` role generates (no gradient flows through sampled tokens), the one in the ``student``
    role is trained on its sequences."""
    check_roles(name, student, teacher)
    check_int("prompt_length", prompt_length, low=1)
    check_nonnegative("sampling_temperature", sampling_temperature)  # 0 is greedy

    def compute(inputs: LossInputs, rng):
        tokens, mask = inputs.batch[TOKENS], inputs.batch[MASK]
        gen_tokens, gen_mask = generate_continuations(
            inputs, teacher, tokens, mask, rng, prompt_length=prompt_length, temperature=sampling_temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, method=name)
        x = {TOKENS: gen_tokens.astype(tokens.dtype), MASK: gen_mask}
        student_logits = apply_participant(inputs, student, x, train=True, method=name).logits
        targets, _ = losses.next_token_targets(x[TOKENS], gen_mask)
        return losses.cross_entropy(shift_logits(student_logits), targets,
                                    mask=generated_target_mask(gen_mask, prompt_length))

    return stateless_method(name, compute, weight=weight, participants=(teacher,), trained=(student,),
                            batch_keys=LM_KEYS)
