"""Method transforms for the logit divergences of :mod:`jaxkd.losses.logit.divergences`.

Every factory returns a :class:`~jaxkd.methods.base.Method` whose loss compares the student's logits with
the teacher's, averaged over the examples that ``batch["mask"]`` keeps; ``student=`` / ``teacher=`` name
the participants in those roles, as in :func:`jaxkd.methods.kd` (the teacher's logits are a
gradient-stopped target).

**No ``T²`` factor** is applied by any of these methods (TRL's GKD and DistiLLM use none; only Hinton KD,
:func:`jaxkd.methods.kd`, does). To get Hinton's gradient scale at a temperature ``T``, pass
``weight=T**2``.
"""

from __future__ import annotations

from jaxkd import losses
from jaxkd.checks import check_in_range, check_number, check_temperature
from jaxkd.methods.base import Method, Weight, logit_method
from jaxkd.methods.registry import LOGIT_ROLES, register

__all__ = ["alpha_beta_divergence", "forward_kl", "generalized_jsd", "js_divergence", "reverse_kl", "skew_kl", "skew_reverse_kl", "total_variation"]


@register("forward_kl", paper="forward KL (Hinton et al. 2015 without T²; GKD's β = 0)", losses=('forward_kl',), contract=LOGIT_ROLES)
def forward_kl(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "forward_kl",
) -> Method:
    """Forward KL ``KL(p_T ‖ p_S)`` at temperature ``T``, without ``T²`` (:func:`jaxkd.losses.forward_kl`).

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); GKD's ``β = 0``
    (Agarwal et al., ICLR 2024). Registry name ``"forward_kl"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.forward_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)


@register("reverse_kl", paper="reverse KL (Gu et al., *MiniLLM*, ICLR 2024, token level; GKD's β = 1)", losses=('reverse_kl',), contract=LOGIT_ROLES)
def reverse_kl(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "reverse_kl",
) -> Method:
    """Reverse KL ``KL(p_S ‖ p_T)``, without ``T²`` (:func:`jaxkd.losses.reverse_kl`).

    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024), as the exact
    token-level divergence (not MiniLLM's sequence-level policy gradient). Registry name ``"reverse_kl"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.reverse_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)


@register("js_divergence", paper='Jensen–Shannon divergence (Lin, *Divergence Measures Based on the Shannon Entropy*, 1991)', losses=('js_divergence',), contract=LOGIT_ROLES)
def js_divergence(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "js_divergence",
) -> Method:
    """Jensen–Shannon divergence ``½KL(p_T‖m) + ½KL(p_S‖m)``, ``m = ½(p_T + p_S)``, without ``T²``.

    Lin, "Divergence Measures Based on the Shannon Entropy" (1991) (:func:`jaxkd.losses.js_divergence`).
    Registry name ``"js_divergence"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.js_divergence, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)


@register("generalized_jsd", paper='Agarwal et al., *On-Policy Distillation of Language Models* (GKD), ICLR 2024', losses=('generalized_jsd',), contract=LOGIT_ROLES)
def generalized_jsd(
    *, beta: float = 0.5, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "generalized_jsd",
) -> Method:
    """GKD's generalized JSD in TRL's convention, without ``T²`` (:func:`jaxkd.losses.generalized_jsd`).

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (ICLR 2024): ``m = β p_T + (1−β) p_S``, ``β KL(p_T‖m) + (1−β) KL(p_S‖m)``; ``β = 0`` is forward KL,
    ``β = 1`` reverse KL (TRL's special cases). This is the loss only: GKD's on-policy student sampling
    (``λ``) is not part of it. Registry name ``"generalized_jsd"``.
    """
    check_in_range("beta", beta, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.generalized_jsd, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, beta=beta)


@register("skew_kl", paper='Ko et al., *DistiLLM*, ICML 2024 (skew KL)', losses=('skew_kl',), contract=LOGIT_ROLES)
def skew_kl(
    *, alpha: float = 0.1, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "skew_kl",
) -> Method:
    """DistiLLM skew KL ``KL(p_T ‖ α p_T + (1−α) p_S)``, without ``T²`` (:func:`jaxkd.losses.skew_kl`).

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1`` as in its code. The KL form: it differs from DistiLLM's cross-entropy by the constant
    ``H(p_T)``, with the same student gradients. DistiLLM's adaptive off-policy sampling is not part of
    it. Registry name ``"skew_kl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.skew_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, alpha=alpha)


@register("skew_reverse_kl", paper='Ko et al., *DistiLLM*, ICML 2024 (skew reverse KL)', losses=('skew_reverse_kl',), contract=LOGIT_ROLES)
def skew_reverse_kl(
    *, alpha: float = 0.1, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "skew_reverse_kl",
) -> Method:
    """DistiLLM skew reverse KL ``KL(p_S ‖ (1−α) p_T + α p_S)``, without ``T²``; see
    :func:`jaxkd.losses.skew_reverse_kl`.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024), default
    ``α = 0.1``. Registry name ``"skew_reverse_kl"``.
    """
    check_in_range("alpha", alpha, 0.0, 1.0)
    check_temperature("temperature", temperature)
    return logit_method(name, losses.skew_reverse_kl, student=student, teacher=teacher, weight=weight,
                        temperature=temperature, alpha=alpha)


@register("total_variation", paper='total variation distance (Wen et al., *f-Divergence Minimization for Sequence-Level KD*, ACL 2023)', losses=('total_variation',), contract=LOGIT_ROLES)
def total_variation(
    *, temperature: float = 1.0, student: str = "student", teacher: str = "teacher", weight: Weight = 1.0,
    name: str = "total_variation",
) -> Method:
    """Total variation distance ``½ Σ |p_T − p_S|`` at temperature ``T``, no ``T²``; see
    :func:`jaxkd.losses.total_variation`.

    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023) use TVD
    among their f-divergences; DistiLLM ships it as a baseline. Registry name ``"total_variation"``.
    """
    check_temperature("temperature", temperature)
    return logit_method(name, losses.total_variation, student=student, teacher=teacher, weight=weight,
                        temperature=temperature)


@register("alpha_beta_divergence", example="alpha=0.5, beta=0.5", paper='Cichocki, Cruces & Amari, *Generalized Alpha-Beta Divergences*, 2011', losses=('alpha_beta_divergence',), contract=LOGIT_ROLES)
def alpha_beta_divergence(
    *, alpha: float, beta: float, temperature: float = 1.0, student: str = "student", teacher: str = "teacher",
    weight: Weight = 1.0, name: str = "alpha_beta_divergence",
) -> Method:
    """Alpha-Beta divergence ``D_AB^(α,β)(p_T ‖ p_S)``, no ``T²`` (:func:`jaxkd.losses.alpha_beta_divergence`).

    Cichocki, Cruces & Amari, "Generalized Alpha-Beta Divergences and Their Application to Robust
    Nonnegative Matrix Factorization" (Entropy, 2011), with teacher ``P`` and student ``Q``; ``α = 1,
    β = 0`` is forward KL, ``α = 0, β = 1`` reverse KL. Registry name ``"alpha_beta_divergence"``.
    """
    check_number("alpha", alpha)
    check_number("beta", beta)
    check_temperature("temperature", temperature)
    return logit_method(
        name, losses.alpha_beta_divergence, student=student, teacher=teacher, weight=weight,
        temperature=temperature, alpha=alpha, beta=beta,
    )
