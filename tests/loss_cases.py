"""The public losses of ``jaxkd.losses`` over [B, C] logits, as cases for the contract tests
(tests/test_loss_contract.py).

A case turns labels into a function of the logit arrays (each ``[B, C]``) returning per-example values
``[B]`` (``reduction="none"``), or a scalar for the batch-level losses. Hyper-parameters are fixed at
non-default, non-trivial values so that a wrong formula shows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses

NONE = {"reduction": "none"}


@dataclasses.dataclass(frozen=True)
class Case:
    """How to exercise one loss.

    Attributes:
      name: the ``jaxkd.losses`` function the case covers.
      make: ``labels -> f(*logits)``; labels are in ``[1, C)`` (class 0 is the one the -inf test drops).
      num_logits: how many ``[B, C]`` logit arrays ``f`` takes (student first).
      grad: which of them the finite-difference test differentiates.
      frozen: for losses with deliberately detached parts, ``(labels, *base_logits) -> g`` with the
        detached parts held at their base value: its finite differences are what the gradient must equal.
      batch_level: ``f`` returns a scalar (the loss couples examples), not per-example values.
      shift: ``"each"`` — invariant to adding a per-row constant to each logit array separately;
        ``"joint"`` — only to adding the same constant to all of them.
      nonnegative: the loss is ``>= 0`` for finite logits.
    """

    name: str
    make: Callable
    num_logits: int = 2
    grad: tuple[int, ...] = (0, 1)
    frozen: Callable | None = None
    batch_level: bool = False
    shift: str = "each"
    nonnegative: bool = True


def _sum(values):
    """The terms functions return tuples; their sum is checked (each term is also a metric)."""
    return sum(values) if isinstance(values, tuple) else values


def _bdkd_frozen(labels, zs, zt, temperature=3.0):
    w_f, w_r = losses.bdkd_weights(zs, zt, temperature=temperature)
    return lambda s, t: temperature**2 * (
        w_f * losses.forward_kl(s, t, temperature=temperature, **NONE)
        + w_r * losses.reverse_kl(s, t, temperature=temperature, **NONE)
    )


def _taid_frozen(labels, zs, zt, t=0.3):
    # TAID's target softmax((1 − t)·sg(z_s) + t·z_t): the student enters it only through sg(z_s).
    frozen_student = jnp.asarray(zs)

    def g(s, teacher):
        target = jax.nn.softmax((1 - t) * frozen_student + t * teacher, axis=-1)
        return -jnp.sum(target * jax.nn.log_softmax(s, axis=-1), axis=-1)

    return g


def _nkd_frozen(labels, zs, zt):
    # NKD detaches the teacher's target probability T_y (a weight), as the official code does.
    t_y = jnp.take_along_axis(jax.nn.softmax(jnp.asarray(zt), -1), jnp.asarray(labels)[:, None], -1)[:, 0]

    def g(s, t):
        full = losses.nkd(s, t, labels, temperature=2.0, gamma=1.7, **NONE)
        # Replace the target part −T_y·log S_y (T_y traced) by the same with T_y held fixed.
        log_s_y = jnp.take_along_axis(jax.nn.log_softmax(s, -1), jnp.asarray(labels)[:, None], -1)[:, 0]
        traced_t_y = jnp.take_along_axis(jax.nn.softmax(t, -1), jnp.asarray(labels)[:, None], -1)[:, 0]
        return full + traced_t_y * log_s_y - t_y * log_s_y

    return g


def _sparse(tail):
    def make(labels):
        def f(s, t):
            indices, log_probs = losses.topk_teacher(t, 3, temperature=1.5)
            return losses.sparse_forward_kl(s, indices, log_probs, temperature=1.5, tail=tail, **NONE)

        return f

    return make


def _dml_frozen(labels, z1, z2):
    # DML's targets are the networks' own logits, gradient-stopped: held at their base value here.
    targets = jnp.stack([jnp.asarray(z1), jnp.asarray(z2)], axis=-2)
    return lambda a, b: losses.dml(jnp.stack([a, b], axis=-2), targets, labels, temperature=1.5, **NONE)


def _dml(labels):
    def f(a, b):
        z = jnp.stack([a, b], axis=-2)
        return losses.dml(z, jax.lax.stop_gradient(z), labels, temperature=1.5, **NONE)

    return f


RATIO = np.linspace(0.1, 0.9, 6)  # tgeo_kd's fusion ratio; cases use B = 6
# The case passes a fresh copy: JAX (0.10) caches the device constant of a NumPy array by identity, so the
# same array closed over in a float32 program and then under enable_x64 stays float32 there and breaks
# the float64 gradient check (seen when the NaN test ran first on the same worker).


CASES = [
    Case("cross_entropy", lambda y: lambda s: losses.cross_entropy(s, y, label_smoothing=0.1, **NONE),
         num_logits=1, grad=(0,)),
    Case("kd", lambda y: lambda s, t: losses.kd(s, t, temperature=3.0, **NONE)),
    Case("forward_kl", lambda y: lambda s, t: losses.forward_kl(s, t, temperature=2.0, **NONE)),
    Case("reverse_kl", lambda y: lambda s, t: losses.reverse_kl(s, t, temperature=2.0, **NONE)),
    Case("js_divergence", lambda y: lambda s, t: losses.js_divergence(s, t, temperature=1.5, **NONE)),
    Case("generalized_jsd", lambda y: lambda s, t: losses.generalized_jsd(s, t, beta=0.3, **NONE)),
    Case("skew_kl", lambda y: lambda s, t: losses.skew_kl(s, t, alpha=0.2, temperature=1.5, **NONE)),
    Case("skew_reverse_kl", lambda y: lambda s, t: losses.skew_reverse_kl(s, t, alpha=0.3, **NONE)),
    Case("total_variation", lambda y: lambda s, t: losses.total_variation(s, t, temperature=2.0, **NONE)),
    Case("alpha_beta_divergence",
         lambda y: lambda s, t: losses.alpha_beta_divergence(s, t, alpha=0.7, beta=0.4, **NONE)),
    Case("sparse_forward_kl", _sparse("bucket")),
    Case("topk_generalized_jsd", lambda y: lambda s, t: losses.topk_generalized_jsd(
        s, t, k=2, beta=0.3, temperature=1.5, **NONE)),
    Case("dkd", lambda y: lambda s, t: losses.dkd(s, t, y, alpha=1.5, beta=3.0, temperature=2.0, **NONE)),
    Case("dkd_terms", lambda y: lambda s, t: _sum(losses.dkd_terms(s, t, y, temperature=3.0, **NONE))),
    Case("kd_ls", lambda y: lambda s, t: losses.kd_ls(s, t, temperature=2.0, **NONE)),
    Case("dist", lambda y: lambda s, t: losses.dist(s, t, beta=1.5, gamma=2.5, temperature=2.0),
         batch_level=True),
    Case("dist_terms", lambda y: lambda s, t: _sum(losses.dist_terms(s, t, temperature=3.0)), batch_level=True),
    Case("nkd", lambda y: lambda s, t: losses.nkd(s, t, y, temperature=2.0, gamma=1.7, **NONE), frozen=_nkd_frozen),
    Case("nkd_terms", lambda y: lambda s, t: _sum(losses.nkd_terms(s, t, y, temperature=2.0, gamma=1.7, **NONE)),
         frozen=_nkd_frozen),
    Case("pld", lambda y: lambda s, t: losses.pld(s, t, y, teacher_temperature=2.0, **NONE)),
    Case("sinkd", lambda y: lambda s, t: losses.sinkd(s, t, temperature=1.5, epsilon=0.5, iterations=8),
         batch_level=True),
    Case("bdkd", lambda y: lambda s, t: losses.bdkd(s, t, temperature=3.0, **NONE), frozen=_bdkd_frozen),
    Case("bdkd_terms", lambda y: lambda s, t: _sum(losses.bdkd_terms(s, t, temperature=3.0, **NONE)),
         frozen=_bdkd_frozen),
    Case("swing", lambda y: lambda s, t: losses.swing(
        s, t, jax.random.PRNGKey(3), base_temperature=2.5, **NONE)),
    Case("binary_kl_norm", lambda y: lambda s, t: losses.binary_kl_norm(s, t, temperature=1.5, **NONE),
         shift="joint"),
    Case("taid", lambda y: lambda s, t: losses.taid(s, t, t=0.3, **NONE), frozen=_taid_frozen),
    Case("tgeo_kd", lambda y: lambda s, t: losses.tgeo_kd(s, t, y, np.array(RATIO), temperature=2.0, **NONE)),
    Case("kd_dp", lambda y: lambda s, t, z0: losses.kd_dp(s, t, z0, y, temperature=2.0, **NONE), num_logits=3,
         grad=(0, 1, 2)),
    Case("dhkd", lambda y: lambda s, a, t: losses.dhkd(s, a, t, y, temperature=1.5, ce_weight=0.7, kd_weight=1.3),
         num_logits=3, grad=(0, 1, 2), batch_level=True, shift="joint"),
    Case("dhkd_terms", lambda y: lambda s, a, t: _sum(losses.dhkd_terms(s, a, t, y, temperature=1.5)),
         num_logits=3, grad=(0, 1, 2), batch_level=True, shift="joint"),
    Case("dho", lambda y: lambda s, h, t: losses.dho(s, h, t, y, temperature=2.5, ce_weight=0.3, kd_weight=0.7),
         num_logits=3, grad=(0, 1, 2), batch_level=True),
    Case("dho_terms", lambda y: lambda s, h, t: _sum(losses.dho_terms(s, h, t, y, temperature=2.5)),
         num_logits=3, grad=(0, 1, 2), batch_level=True),
    Case("multi_teacher_kd", lambda y: lambda s, t1, t2: losses.multi_teacher_kd(
        s, jnp.stack([t1, t2], axis=-2), teacher_weights=(0.7, 0.2), temperature=2.0, **NONE),
        num_logits=3, grad=(0, 1, 2)),
    Case("dml", _dml, frozen=_dml_frozen),
    # MST-Distill: the router's probabilities are fixed (they only select teachers: no gradient through them).
    Case("mst_distill", lambda y: lambda s, t1, t2: losses.mst_distill(
        s, jnp.stack([t1, t2], axis=-2), np.array([[0.7, 0.3], [0.2, 0.8]] * 3), k=1, temperature=2.0, **NONE),
        num_logits=3, grad=(0, 1, 2)),
    # Teachers that move: mean teacher's consistency, Tf-KD_reg's virtual teacher ---
    Case("mean_teacher", lambda y: lambda s, t: losses.mean_teacher(s, t, **NONE)),
    Case("mean_teacher", lambda y: lambda s, t: losses.mean_teacher(s, t, consistency="kl", **NONE)),
    Case("tf_kd_virtual_teacher", lambda y: lambda s: losses.tf_kd_virtual_teacher(
        s, y, correct_prob=0.8, temperature=0.7, **NONE), num_logits=1, grad=(0,)),
]
