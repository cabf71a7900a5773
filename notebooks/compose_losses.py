# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Composing a distillation loss from `jaxkd.losses`
#
# Losses in jaxkd are pure functions of arrays, so a new objective is ordinary JAX code: combine them,
# `jit` the result, take its gradient. This notebook builds "label cross-entropy + Hinton KD" by hand,
# checks its gradient against the closed form, and plots what the temperature does to the teacher's
# distribution. (`compose_losses.ipynb` is stored with its outputs; `compose_losses.py` is the same
# notebook as a jupytext percent-format script, kept in sync with `jupytext --sync`, which also runs as
# `python notebooks/compose_losses.py`.)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxkd import losses

rng = np.random.default_rng(0)
num_classes = 10
teacher_logits = jnp.asarray(rng.normal(size=(4, num_classes)) * 3, jnp.float32)
student_logits = jnp.asarray(rng.normal(size=(4, num_classes)), jnp.float32)
labels = jnp.asarray(teacher_logits.argmax(-1))

# %% [markdown]
# ## A composed loss: `alpha * CE + (1 - alpha) * KD`


# %%
def ce_plus_kd(student, teacher, labels, *, alpha=0.1, temperature=4.0):
    ce = losses.cross_entropy(student, labels)
    kd = losses.kd(student, jax.lax.stop_gradient(teacher), temperature=temperature)
    return alpha * ce + (1 - alpha) * kd


loss_fn = jax.jit(ce_plus_kd, static_argnames=("alpha", "temperature"))
value, grad = jax.value_and_grad(loss_fn)(student_logits, teacher_logits, labels)
print(f"loss = {float(value):.4f}")

# %% [markdown]
# The gradient has a closed form: per example, `∂CE/∂z_s = softmax(z_s) − onehot(y)` and
# `∂KD/∂z_s = T · (softmax(z_s/T) − softmax(z_t/T))`, each divided by the batch size.

# %%
B, T, alpha = student_logits.shape[0], 4.0, 0.1
closed_form = (
    alpha * (jax.nn.softmax(student_logits) - jax.nn.one_hot(labels, num_classes))
    + (1 - alpha) * T * (jax.nn.softmax(student_logits / T) - jax.nn.softmax(teacher_logits / T))
) / B
np.testing.assert_allclose(grad, closed_form, rtol=1e-4, atol=1e-6)
print("autodiff gradient matches the closed form")

# %% [markdown]
# ## What the temperature does
# Higher T flattens the teacher's distribution and exposes the "dark knowledge" in its non-argmax
# classes; a few gradient steps move the student's tempered distribution onto the teacher's.

# %%
student = student_logits
step = jax.jit(lambda s: s - 2.0 * jax.grad(loss_fn)(s, teacher_logits, labels))
for _ in range(200):
    student = step(student)

fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
classes = np.arange(num_classes)
for ax, temperature in zip(axes, (1.0, 4.0, 10.0)):
    ax.bar(classes - 0.2, jax.nn.softmax(teacher_logits[0] / temperature), width=0.4, label="teacher")
    ax.bar(classes + 0.2, jax.nn.softmax(student[0] / temperature), width=0.4, label="student (trained)")
    ax.set_title(f"T = {temperature:g}")
    ax.set_xlabel("class")
axes[0].set_ylabel("probability")
axes[0].legend()
fig.tight_layout()

final_kd = float(losses.kd(student, teacher_logits, temperature=4.0))
print(f"KD after 200 steps: {final_kd:.4f} (from {float(losses.kd(student_logits, teacher_logits, temperature=4.0)):.4f})")
assert final_kd < float(losses.kd(student_logits, teacher_logits, temperature=4.0))

# %% [markdown]
# ## Every objective is the same kind of function
# Divergences and named methods share the signature `(student_logits, teacher_logits, ...)`, so swapping
# the objective is a one-word change. Their values on the original pair:

# %%
objectives = {
    "forward KL": lambda s, t: losses.forward_kl(s, t),
    "reverse KL": lambda s, t: losses.reverse_kl(s, t),
    "JS": lambda s, t: losses.js_divergence(s, t),
    "generalized JSD (beta=0.5)": lambda s, t: losses.generalized_jsd(s, t, beta=0.5),
    "total variation": lambda s, t: losses.total_variation(s, t),
    "DKD (alpha=1, beta=8, T=4)": lambda s, t: losses.dkd(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0),
    "DIST (T=4)": lambda s, t: losses.dist(s, t, temperature=4.0),
}
for name, objective in objectives.items():
    value = float(jax.jit(objective)(student_logits, teacher_logits))
    assert np.isfinite(value) and value >= 0.0
    print(f"{name:28s} {value:8.4f}")
