"""Deep mutual learning: the student and trained peers teach each other."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.checks import check_temperature
from jaxkd.methods.base import Method, Weight, stateless_method
from jaxkd.methods.registry import register

__all__ = ["dml"]


@register("dml", paper="Zhang, Xiang, Hospedales & Lu, *Deep Mutual Learning*, CVPR 2018", losses=("dml",))
def dml(
    *, peers: Sequence[str] = ("peer",), temperature: float = 1.0, weight: Weight = 1.0, name: str = "dml"
) -> Method:
    """Deep mutual learning between the student and the trained participants ``peers``
    (:func:`jaxkd.losses.dml`): every network's cross-entropy plus its mean KL towards each other's
    (gradient-stopped) predictions. The whole objective — do not add ``ce`` as well, it would count the
    student's cross-entropy twice. All networks are trained and evaluated (``peer_accuracy``).

    Metrics: ``<network>/ce`` for each network.
    """
    peers = tuple(peers)
    if not peers or len(set(peers)) != len(peers) or "student" in peers:
        raise ValueError(f"peers must be distinct participant names other than 'student', got {peers!r}")
    check_temperature("temperature", temperature)
    networks = ("student", *peers)

    def compute(inputs, rng):
        labels, mask = inputs.labels(name), inputs.label_mask
        logits = jnp.stack([inputs.output(n, method=name).logits for n in networks], axis=-2)
        value = losses.dml(logits, jax.lax.stop_gradient(logits), labels, temperature=temperature, mask=mask)
        metrics = {
            f"{n}/ce": losses.cross_entropy(logits[..., i, :], labels, mask=mask) for i, n in enumerate(networks)
        }
        return value, metrics

    return stateless_method(name, compute, weight=weight, needs_labels=True, trained=peers)
