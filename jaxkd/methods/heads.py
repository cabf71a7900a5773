"""Small dense heads owned by methods (their parameters are method parameters, stepped with the student)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxkd.models.base import Outputs, get_feature


def dense_init(rng: jax.Array, d_in: int, d_out: int) -> dict:
    """PyTorch's default ``nn.Linear`` init: weight and bias ~ U(−1/√d_in, 1/√d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    k1, k2 = jax.random.split(rng)
    return {
        "kernel": jax.random.uniform(k1, (d_in, d_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k2, (d_out,), jnp.float32, -bound, bound),
    }


def dense(params: dict, x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32) @ params["kernel"] + params["bias"]


def head_init(rng: jax.Array, d_in: int, num_classes: int, hidden: int | None) -> dict:
    if hidden is None:
        return {"out": dense_init(rng, d_in, num_classes)}
    k1, k2 = jax.random.split(rng)
    return {"hidden": dense_init(k1, d_in, hidden), "out": dense_init(k2, hidden, num_classes)}


def head_apply(params: dict, x: jax.Array) -> jax.Array:
    if "hidden" in params:
        x = jax.nn.relu(dense(params["hidden"], x))
    return dense(params["out"], x)


def feature_head_init(rng: jax.Array, outputs: Outputs, feature: str, hidden: int | None = None) -> dict:
    """A classifier head (linear, or with one hidden layer) on the student's ``[batch, dim]`` ``feature``,
    sized from the (abstract) outputs ``init`` receives: ``dim -> [hidden ->] num_classes``."""
    f = get_feature(outputs, feature, who="student")
    if f.ndim != 2:
        raise ValueError(f"a feature head reads a [batch, dim] feature; {feature!r} has shape {f.shape}")
    return head_init(rng, f.shape[-1], outputs.logits.shape[-1], hidden)


def feature_head(params: dict, outputs: Outputs, feature: str) -> jax.Array:
    """The head's logits on ``outputs.features[feature]``."""
    return head_apply(params, get_feature(outputs, feature, who="student"))
