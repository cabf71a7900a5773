"""MiniLLM: reverse-KL distillation of language models by policy gradient on student-sampled sequences.

Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024). The
student ``q_θ`` minimizes the sequence-level reverse KL ``KL(q_θ ‖ p) = −E_{y∼q_θ} log p(y|x)/q_θ(y|x)``.
With the per-step reward ``r_t = log p(y_t|y_<t, x) − log q_θ(y_t|y_<t, x)`` its gradient splits (the
paper's single-step decomposition) into

* the **single-step term**, the exact reverse KL of every step over the whole vocabulary,
  ``Σ_t ∇ KL(q_θ(·|y_<t, x) ‖ p(·|y_<t, x))`` (:func:`minillm_single_step_kl`), and
* the **long-term term**, a policy gradient ``−Σ_t R_{t+1} ∇ log q_θ(y_t|y_<t, x)`` with the future
  rewards ``R`` (:func:`minillm_rewards`, :func:`minillm_returns`, :func:`minillm_advantages`,
  :func:`minillm_pg_loss`),

with length normalization of ``R`` and *teacher-mixed sampling*: sequences are drawn from
``p̃ = α·p + (1 − α)·q_θ`` (:func:`minillm_mixture_log_probs`, ``α = 0.2``) and every term is reweighted
by the per-token importance weight ``w_t = q_θ(y_t)/p̃(y_t)`` (:func:`minillm_importance_weights`).
:func:`minillm` combines them.

Checked against the official code, ``microsoft/LMOps`` ``minillm/`` (``minillm/losses.py``, ``sampler.py``,
``reward.py``, ``utils.py``, ``arguments.py`` and ``scripts/gpt2/minillm/train_base_xl.sh``). Where the
code and the paper differ jaxkd follows the code by default and offers the paper's form:

==============================  ===========================================  =====================================
                                official code (default here)                 paper
==============================  ===========================================  =====================================
future reward at step t         ``Σ_{t'≥t} γ^{t'−t} r_t'`` (includes r_t)    ``R_{t+1} = Σ_{t'>t} r_t'``
discount γ                      0.95 (``--gamma``)                           none (γ = 1)
length normalization            ÷ number of summed tokens                    mean of the summed rewards
rewards                         ÷ ``reward_scaling`` 0.5, clipped to ±100    ``r_t`` as is
advantages                      whitened over all B·T entries (padding too)  —
long-term surrogate             PPO clip, ratio·w clipped to [0.8, 1.2]      plain ``w·R·∇ log q``
single-step term                not importance-weighted                      weighted by ``w_t``
==============================  ===========================================  =====================================

(``include_current_reward=False, gamma=1.0, reward_scaling=None, clip_reward=None, whiten=None,
importance_weight_single_step=True`` is the paper's estimator; ``clip_range`` has no paper value — a
large one removes the clip.) One default departs from the code: ``whiten="tokens"`` whitens over the
unmasked tokens, where the code's statistics include the padding's zeros (``whiten="batch"``, see
:func:`minillm_advantages`). The official training script also adds a language-modeling loss on
pre-training data (``--lm-coef``), which is a separate term here (a token cross-entropy). The code was
read here; the paper's column is from the published paper (its method section could not be re-read in
this project's sources, which hold only its abstract).

**The surrogate.** A policy gradient is the gradient of a surrogate, not of the objective's value:
``minillm`` is ``L_pg + L_single`` with
``L_pg = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))``,
``ρ_t = w_t·exp(log q_θ(y_t) − log q_old(y_t))``, where the advantages ``A`` (built from rewards that use ``q_old``), the weights ``w`` and ``q_old`` are
constants. ``q_old`` is the student when the rollout was sampled (``behaviour_log_probs``; PPO's old
policy — the official code reuses each rollout for 4 epochs). Without it, ``q_old = stop_gradient(q_θ)``:
the value of ``ρ`` is ``w`` and its gradient ``w·∇ log q_θ(y_t)``, the paper's policy gradient.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxkd.checks import check_choice, check_in_range, check_positive, check_same_logits
from jaxkd.losses.core import Array, compute_dtype, log_mixture, log_softmax, per_example_loss, reduce_loss
from jaxkd.losses.logit.divergences import reverse_kl
from jaxkd.losses.lm.dpo import token_log_probs
from jaxkd.losses.lm.tokens import check_sequence_logits

__all__ = [
    "minillm_advantages",
    "minillm_importance_weights",
    "minillm",
    "minillm_mixture_log_probs",
    "minillm_pg_loss",
    "minillm_returns",
    "minillm_rewards",
    "minillm_single_step_kl",
    "minillm_terms",
]

Whiten = Literal["batch", "tokens"]

#: ``whiten``'s variance floor (``utils.whiten``: ``(x − mean)·rsqrt(var + 1e-8)``).
_WHITEN_EPS = 1e-8


def _check_sequences(name: str, x, mask) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {jnp.shape(x)}")
    if mask is not None and jnp.shape(mask) != jnp.shape(x):
        raise ValueError(f"mask must have {name}'s shape {jnp.shape(x)}, got {jnp.shape(mask)}")


def _mask(mask, x) -> Array:
    return jnp.ones(jnp.shape(x), bool) if mask is None else jnp.asarray(mask, bool)


@per_example_loss
def minillm_single_step_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """MiniLLM's single-step term: the exact reverse KL ``KL(q_θ(·|y_<t) ‖ p(·|y_<t))`` per step.

    ``Σ_v q_θ(v)·(log q_θ(v) − log p(v))`` over the vocabulary, differentiable through the student only
    (the teacher is detached). The official ``Loss._reg_loss`` computes the same value as cross-entropy
    minus entropy, dropping every vocabulary entry that is ``-inf`` on either side — the convention of
    :func:`jaxkd.losses.reverse_kl`, which this is. Token mean over ``mask`` as in the official code.
    """
    check_same_logits(student_logits, teacher_logits)
    return reverse_kl(student_logits, jax.lax.stop_gradient(teacher_logits), reduction="none")


def minillm_rewards(
    teacher_log_probs: Array,
    student_log_probs: Array,
    mask: Array | None = None,
    *,
    reward_scaling: float | None = None,
    clip_reward: float | None = None,
) -> Array:
    """Per-token rewards ``r_t = log p(y_t) − log q(y_t)``, detached: ``[B, T]`` → ``[B, T]``.

    ``q`` is the student that sampled the sequence (the official sampler uses the rollout-time
    log-probabilities). The official code then divides by ``reward_scaling`` (``--reward-scaling``, 0.5 in
    the training scripts) and clips to ``±clip_reward`` (``--cliprange-reward``, 100 in the scripts);
    ``None`` skips either step (the paper's ``r_t``). Masked positions are 0.
    """
    _check_sequences("teacher_log_probs", teacher_log_probs, mask)
    if jnp.shape(student_log_probs) != jnp.shape(teacher_log_probs):
        raise ValueError(
            f"student_log_probs must have teacher_log_probs' shape {jnp.shape(teacher_log_probs)}, "
            f"got {jnp.shape(student_log_probs)}"
        )
    if reward_scaling is not None:
        check_positive("reward_scaling", reward_scaling)
    if clip_reward is not None:
        check_positive("clip_reward", clip_reward)
    dtype = compute_dtype(teacher_log_probs)
    m = _mask(mask, teacher_log_probs)
    # Masked entries may hold anything (padding): select before subtracting.
    t = jnp.where(m, jnp.asarray(teacher_log_probs, dtype), 0.0)
    s = jnp.where(m, jnp.asarray(student_log_probs, dtype), 0.0)
    r = t - s
    if reward_scaling is not None:
        r = r / reward_scaling
    if clip_reward is not None:
        r = jnp.clip(r, -clip_reward, clip_reward)
    return jax.lax.stop_gradient(jnp.where(m, r, 0.0))


def _reverse_discounted_sum(x: Array, gamma: float) -> Array:
    """``y_t = Σ_{t'≥t} γ^{t'−t} x_t'`` along the last axis of ``[B, T]`` (a reverse scan)."""

    def step(carry, xt):
        carry = xt + gamma * carry
        return carry, carry

    _, ys = jax.lax.scan(step, jnp.zeros(x.shape[:1], x.dtype), jnp.swapaxes(x, 0, 1), reverse=True)
    return jnp.swapaxes(ys, 0, 1)


def _shift_left(x: Array) -> Array:
    """``y_t = x_{t+1}`` (0 at the last position)."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def minillm_returns(
    rewards: Array,
    mask: Array | None = None,
    *,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current_reward: bool = True,
) -> Array:
    """Future rewards with MiniLLM's length normalization, detached: ``[B, T]`` → ``[B, T]``.

    Official code (``Loss._get_advantages_and_returns``, the default here):
    ``R_t = Σ_{t'≥t} γ^{t'−t} r_t' / n_t`` with ``n_t = Σ_{t'≥t} mask_t'`` the number of tokens from ``t``
    to the end (the code's ``lens``, 0 replaced by 1), ``γ = 0.95``. ``include_current_reward=False`` gives
    the paper's ``R_{t+1}``: the sum over ``t' > t`` (discounted from ``t + 1``) divided by the number of
    those tokens; with ``gamma=1.0`` it is the paper's length-normalized ``R^Norm_{t+1}``, the mean of the
    future rewards (0 at the last token). ``length_norm=False`` skips the division. Masked rewards count
    as 0; masked positions of the output are 0.

    The division by the undiscounted count with ``γ < 1`` is the official code's (TRL's ``MiniLLMTrainer``
    divides by the discounted count ``Σ γ^{t'−t}`` instead; not followed).
    """
    _check_sequences("rewards", rewards, mask)
    check_in_range("gamma", gamma, 0.0, 1.0)
    dtype = compute_dtype(rewards)
    m = _mask(mask, rewards)
    r = jnp.where(m, jnp.asarray(rewards, dtype), 0.0)
    g = _reverse_discounted_sum(r, gamma)
    n = _reverse_discounted_sum(m.astype(dtype), 1.0)
    if not include_current_reward:
        g, n = _shift_left(g), _shift_left(n)
    if length_norm:
        g = g / jnp.where(n == 0, 1.0, n)
    return jax.lax.stop_gradient(jnp.where(m, g, 0.0))


def _whiten(x: Array, selected: Array) -> Array:
    """``(x − mean)·rsqrt(var + 1e-8)`` with the mean and the unbiased variance of the selected entries
    (``torch.var_mean``'s default, as the official ``whiten``)."""
    w = selected.astype(x.dtype)
    count = jnp.sum(w)
    mean = jnp.sum(w * x) / jnp.maximum(count, 1.0)
    var = jnp.sum(w * (x - mean) ** 2) / jnp.maximum(count - 1.0, 1.0)
    return (x - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)


def minillm_advantages(
    rewards: Array,
    mask: Array | None = None,
    *,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current_reward: bool = True,
    whiten: Whiten | None = "tokens",
) -> Array:
    """The long-term term's advantages: :func:`minillm_returns`, whitened, detached (``[B, T]``).

    ``whiten`` (the official code whitens, ``use_whitening=True``; the paper does not):

    * ``"batch"`` — exactly the official ``whiten``: mean and unbiased variance over *all* ``B·T`` entries
      of the batch, the padding's zero returns included (so the amount of padding changes the advantages);
    * ``"tokens"`` (default) — the same over the unmasked tokens only: equal to ``"batch"`` when nothing
      is masked, independent of padding otherwise;
    * ``None`` — the returns themselves (the paper).

    Statistics are over the batch given (under a sharded batch, the global one, as the official code's
    all-reduce). Masked positions of the output are 0.
    """
    if whiten is not None:
        check_choice("whiten", whiten, ("batch", "tokens"))
    m = _mask(mask, rewards)
    returns = minillm_returns(
        rewards, mask, gamma=gamma, length_norm=length_norm, include_current_reward=include_current_reward
    )
    if whiten is None:
        return returns
    selected = jnp.ones_like(m) if whiten == "batch" else m
    return jax.lax.stop_gradient(jnp.where(m, _whiten(returns, selected), 0.0))


def minillm_importance_weights(
    student_log_probs: Array, teacher_log_probs: Array, mask: Array | None = None, *, alpha: float = 0.2
) -> Array:
    """Teacher-mixed sampling's per-token importance weights, detached: ``[B, T]`` → ``[B, T]``.

    ``w_t = q(y_t) / ((1 − α)·q(y_t) + α·p(y_t))`` — the paper's per-token approximation of the sequence
    ratio ``q_θ(y)/p̃(y)``, computed as the official sampler does from the rollout-time student and teacher
    log-probabilities of the sampled tokens (``α = --teacher-mixed-alpha``, 0.2 in the scripts). The
    official code does not clip ``w``; the clip is on ``ρ = w·exp(log q_θ − log q_old)`` in the PPO
    surrogate (:func:`minillm_pg_loss`). ``w ≤ 1/(1 − α)``. Masked positions are 1 (as the official masked
    log-probabilities of 0 give).
    """
    _check_sequences("student_log_probs", student_log_probs, mask)
    if jnp.shape(teacher_log_probs) != jnp.shape(student_log_probs):
        raise ValueError(
            f"teacher_log_probs must have student_log_probs' shape {jnp.shape(student_log_probs)}, "
            f"got {jnp.shape(teacher_log_probs)}"
        )
    check_in_range("alpha", alpha, 0.0, 1.0)
    dtype = compute_dtype(student_log_probs)
    m = _mask(mask, student_log_probs)
    log_q = jnp.where(m, jnp.asarray(student_log_probs, dtype), 0.0)
    log_p = jnp.where(m, jnp.asarray(teacher_log_probs, dtype), 0.0)
    log_w = log_q - log_mixture(log_p, log_q, alpha)
    return jax.lax.stop_gradient(jnp.where(m, jnp.exp(log_w), 1.0))


def minillm_mixture_log_probs(student_logits: Array, teacher_logits: Array, *, alpha: float = 0.2) -> Array:
    """``log p̃ = log((1 − α)·softmax(z_s) + α·softmax(z_t))`` over the vocabulary: the distribution MiniLLM
    samples from (teacher-mixed sampling, ``α = 0.2`` in the official scripts, done there by a forked
    ``transformers.generate`` with ``mix_in_alpha``). Detached: sampling is not differentiated."""
    check_same_logits(student_logits, teacher_logits)
    check_in_range("alpha", alpha, 0.0, 1.0)
    return jax.lax.stop_gradient(log_mixture(log_softmax(teacher_logits), log_softmax(student_logits), alpha))


def minillm_pg_loss(
    student_log_probs: Array,
    behaviour_log_probs: Array,
    advantages: Array,
    mask: Array | None = None,
    *,
    importance_weights: Array | None = None,
    clip_range: float = 0.2,
    reduction: Literal["mean", "sum", "none"] = "mean",
    normalizer: Array | float | None = None,
) -> Array:
    """The long-term term's clipped policy-gradient surrogate (official ``Loss._pg_loss``).

    Per token ``max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))`` with
    ``ρ_t = w_t·exp(log q_θ(y_t) − log q_old(y_t))``; ``A``, ``w`` and ``log q_old`` (``behaviour_log_probs``,
    the student's log-probabilities when the rollout was sampled) are constants. At ``q_θ = q_old`` its
    gradient is ``−A_t·w_t·∇ log q_θ(y_t)`` (with ``w_t ∈ [1 − ε, 1 + ε]``; beyond, the clipped side's
    zero gradient where it is the max). ``ε = clip_range`` (``--cliprange``, 0.2). The log-ratio is 0 at
    masked positions (as the official ``* mask``) so padding never overflows ``exp``.

    Args:
      student_log_probs: ``[B, T]`` differentiable ``log q_θ`` of the sampled tokens.
      behaviour_log_probs: ``[B, T]``.
      advantages: ``[B, T]`` (:func:`minillm_advantages`).
      mask: boolean ``[B, T]``.
      importance_weights: ``[B, T]`` (:func:`minillm_importance_weights`) or ``None`` (all 1).
      clip_range: ``ε > 0``.
      reduction, normalizer: as :func:`jaxkd.losses.reduce_loss`; the default is the official token
        mean over ``mask``.
    """
    _check_sequences("student_log_probs", student_log_probs, mask)
    for name, x in (("behaviour_log_probs", behaviour_log_probs), ("advantages", advantages),
                    ("importance_weights", importance_weights)):
        if x is not None and jnp.shape(x) != jnp.shape(student_log_probs):
            raise ValueError(f"{name} must have student_log_probs' shape {jnp.shape(student_log_probs)}, got {jnp.shape(x)}")
    check_positive("clip_range", clip_range)
    dtype = compute_dtype(student_log_probs)
    m = _mask(mask, student_log_probs)
    log_q = jnp.asarray(student_log_probs, dtype)
    old = jax.lax.stop_gradient(jnp.asarray(behaviour_log_probs, dtype))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, dtype))
    log_ratio = jnp.where(m, log_q - old, 0.0)
    ratio = jnp.exp(log_ratio)
    if importance_weights is not None:
        ratio = ratio * jax.lax.stop_gradient(jnp.asarray(importance_weights, dtype))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return reduce_loss(jnp.maximum(unclipped, clipped), mask=m, reduction=reduction, normalizer=normalizer)


def _check_rollout(student_logits, teacher_logits, sampled_tokens, mask, behaviour_log_probs) -> None:
    check_sequence_logits(student_logits, teacher_logits, "sampled_tokens", sampled_tokens)
    if jnp.shape(mask) != jnp.shape(sampled_tokens):
        raise ValueError(f"mask must have sampled_tokens' shape {jnp.shape(sampled_tokens)}, got {jnp.shape(mask)}")
    if behaviour_log_probs is not None and jnp.shape(behaviour_log_probs) != jnp.shape(sampled_tokens):
        raise ValueError(
            f"behaviour_log_probs must have sampled_tokens' shape {jnp.shape(sampled_tokens)}, "
            f"got {jnp.shape(behaviour_log_probs)}"
        )


def minillm_terms(
    student_logits: Array,
    teacher_logits: Array,
    sampled_tokens: Array,
    mask: Array,
    *,
    behaviour_log_probs: Array | None = None,
    teacher_mix_alpha: float | None = None,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current_reward: bool = True,
    reward_scaling: float | None = 0.5,
    clip_reward: float | None = 100.0,
    whiten: Whiten | None = "tokens",
    clip_range: float = 0.2,
    importance_weight_single_step: bool = False,
    normalizer: Array | float | None = None,
) -> tuple[Array, Array]:
    """MiniLLM's ``(long-term policy-gradient loss, single-step loss)`` on a sampled batch; see
    :func:`minillm` (their sum) for the arguments."""
    _check_rollout(student_logits, teacher_logits, sampled_tokens, mask, behaviour_log_probs)
    if teacher_mix_alpha is not None:
        check_in_range("teacher_mix_alpha", teacher_mix_alpha, 0.0, 1.0)
    elif importance_weight_single_step:
        raise ValueError("importance_weight_single_step=True needs teacher_mix_alpha (the weights come from the mixture)")
    m = jnp.asarray(mask, bool)
    log_q = token_log_probs(student_logits, sampled_tokens, m)
    log_p = jax.lax.stop_gradient(token_log_probs(teacher_logits, sampled_tokens, m))
    if behaviour_log_probs is None:
        old = jax.lax.stop_gradient(log_q)
    else:
        old = jax.lax.stop_gradient(jnp.where(m, jnp.asarray(behaviour_log_probs, log_q.dtype), 0.0))
    rewards = minillm_rewards(log_p, old, m, reward_scaling=reward_scaling, clip_reward=clip_reward)
    advantages = minillm_advantages(
        rewards, m, gamma=gamma, length_norm=length_norm, include_current_reward=include_current_reward, whiten=whiten
    )
    w = None if teacher_mix_alpha is None else minillm_importance_weights(old, log_p, m, alpha=teacher_mix_alpha)
    pg = minillm_pg_loss(log_q, old, advantages, m, importance_weights=w, clip_range=clip_range, normalizer=normalizer)
    single = minillm_single_step_kl(student_logits, teacher_logits, mask=m, reduction="none")
    if importance_weight_single_step:
        # The paper's E_p̃[Σ_t w_t ∇KL_t]: weighted terms over the token count (not a Σw-weighted mean).
        single = single * w
    return pg, reduce_loss(single, mask=m, normalizer=normalizer)


def minillm(
    student_logits: Array,
    teacher_logits: Array,
    sampled_tokens: Array,
    mask: Array,
    *,
    behaviour_log_probs: Array | None = None,
    teacher_mix_alpha: float | None = None,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current_reward: bool = True,
    reward_scaling: float | None = 0.5,
    clip_reward: float | None = 100.0,
    whiten: Whiten | None = "tokens",
    clip_range: float = 0.2,
    single_step: bool = True,
    importance_weight_single_step: bool = False,
    normalizer: Array | float | None = None,
) -> Array:
    """MiniLLM's loss on a batch of sequences sampled by the student (or the teacher-mixed policy).

    ``L = L_pg + L_single`` (the official ``ppo_loss`` with ``--single-step-reg``), both token means over
    ``mask``; see the module docstring for the surrogate and the code-vs-paper table. Steps:
    ``log q_θ``, ``log p`` of the sampled tokens (:func:`jaxkd.losses.token_log_probs`; the teacher
    detached); rewards from ``log p − log q_old`` (:func:`minillm_rewards`); advantages
    (:func:`minillm_advantages`); importance weights when the rollout came from the mixture
    (:func:`minillm_importance_weights`); the clipped surrogate (:func:`minillm_pg_loss`); the
    single-step reverse KL (:func:`minillm_single_step_kl`).

    Defaults are the official GPT-2 and LLaMA training scripts' settings (``--gamma`` 0.95,
    ``--length-norm``, ``--reward-scaling 0.5``, ``--cliprange-reward 100``, ``--cliprange 0.2``,
    ``--single-step-reg``), except ``whiten="tokens"`` (see :func:`minillm_advantages`; ``"batch"`` is the
    official computation).

    Args:
      student_logits, teacher_logits: ``[B, T, V]``, aligned: position ``t`` scores ``sampled_tokens[:, t]``
        (use :func:`jaxkd.losses.shift_logits` on a causal LM's outputs).
      sampled_tokens: int ``[B, T]``, the sampled response tokens.
      mask: bool ``[B, T]``, the response tokens (prompt and padding False).
      behaviour_log_probs: ``[B, T]`` student log-probabilities of the sampled tokens when the rollout
        was drawn (PPO's old policy); ``None``: the current student, detached (on-policy).
      teacher_mix_alpha: ``α`` when the rollout was sampled from ``p̃ = α·p + (1 − α)·q`` (0.2 in the
        official scripts); ``None`` when it was sampled from the student (all weights 1).
      gamma, length_norm, include_current_reward: :func:`minillm_returns`.
      reward_scaling, clip_reward: :func:`minillm_rewards` (``None`` skips).
      whiten: :func:`minillm_advantages`.
      clip_range: the PPO clip ``ε``.
      single_step: add the single-step term (``--single-step-reg``, on in every official script).
      importance_weight_single_step: weight the single-step term by ``w_t`` (the paper; the code does not).
      normalizer: the token count dividing both token sums (the global count under gradient
        accumulation; see :func:`jaxkd.losses.reduce_loss`).

    A batch with no unmasked token gives 0 and zero gradients.
    """
    pg, single = minillm_terms(
        student_logits, teacher_logits, sampled_tokens, mask,
        behaviour_log_probs=behaviour_log_probs, teacher_mix_alpha=teacher_mix_alpha, gamma=gamma,
        length_norm=length_norm, include_current_reward=include_current_reward, reward_scaling=reward_scaling,
        clip_reward=clip_reward, whiten=whiten, clip_range=clip_range,
        importance_weight_single_step=importance_weight_single_step, normalizer=normalizer,
    )
    return pg + single if single_step else pg

