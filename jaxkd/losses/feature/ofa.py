"""OFA-KD's loss: KD towards a teacher distribution whose target class is adaptively enhanced."""

from __future__ import annotations

import jax.numpy as jnp

from jaxkd.checks import check_labels, check_positive, check_same_logits, check_temperature
from jaxkd.losses.core import Array, is_masked, label_one_hot, log_softmax, per_example_loss, probs

__all__ = ["ofa"]


@per_example_loss
def ofa(
    student_logits: Array, teacher_logits: Array, labels: Array, *, eps: float = 1.0, temperature: float = 1.0
) -> Array:
    """The OFA loss (Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation", NeurIPS 2023), per example.

    With ``p^s = softmax(z_s / T)``, ``p^t = softmax(z_t / T)`` and ``𝟙_y`` the one-hot label:

    ``L = −Σ_c [ (p^t_c + 𝟙_y[c])^ε − 𝟙_y[c] ] · log p^s_c``

    i.e. the non-target classes get the teacher's ``p^t_c`` (``(p^t_c)^ε`` for ``ε ≠ 1``) and the target class
    ``(1 + p^t_y)^ε − 1``: with ``ε > 1`` the target term is enhanced more the more confident the teacher
    is (the paper's adaptive target enhancement, Eq. 5). ``ε = 1`` is cross-entropy with the soft target
    ``p^t`` (KD without the teacher-entropy constant). This is exactly the official ``ofa_loss``
    (``distillers/ofa.py`` of github.com/Hao840/OFAKD): no ``T²`` factor; the official default is
    ``ε = 1`` and ``T = 1`` (``train.py``), its ImageNet example uses ``--ofa-eps 1.5``. The official code
    takes ``log softmax`` as ``log(softmax)``; here it is computed stably. A class excluded by both
    (``-inf`` logits) contributes 0.

    Args:
      student_logits: ``[..., C]``, the student's final logits or a branch head's logits.
      teacher_logits: ``[..., C]`` (gradient-stopped by the caller in training).
      labels: integer labels ``[...]``.
      eps: ``ε > 0``, the target-enhancement exponent.
      temperature: ``T``.
    """
    check_positive("eps", eps)
    check_temperature("temperature", temperature)
    check_same_logits(student_logits, teacher_logits)
    check_labels(labels, student_logits)
    one_hot, valid = label_one_hot(labels, jnp.shape(student_logits)[-1])
    log_p_s = log_softmax(student_logits, temperature)
    p_t = probs(log_softmax(teacher_logits, temperature))
    target = one_hot.astype(p_t.dtype)
    weight = (p_t + target) ** eps - target
    excluded = is_masked(log_p_s)
    terms = jnp.where(excluded, 0.0, weight * jnp.where(excluded, 0.0, log_p_s))
    return jnp.where(valid, -jnp.sum(terms, axis=-1), jnp.nan)
