"""Tf-KD_reg: the virtual-teacher regularizer against the official PyTorch computation (transcribed with torch from
yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py, loss_kd_regularization, commit 880a74e) and
against NumPy of its formula; the method in a chain with ce; bad hyper-parameters."""

import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jaxkd
from jaxkd import losses, methods
from tests.helpers import tiny_batch, tiny_models


def official_loss_kd_regularization(outputs, labels, reg_alpha, reg_temperature, multiplier, correct_prob=0.99):
    """The official function's computation (``.cuda()`` dropped; ``correct_prob`` is hard-coded 0.99 there)."""
    loss_ce = F.cross_entropy(outputs, labels)
    k = outputs.size(1)
    teacher_soft = torch.ones_like(outputs) * (1 - correct_prob) / (k - 1)
    for i in range(outputs.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    loss_soft_regu = nn.KLDivLoss()(F.log_softmax(outputs, dim=1), F.softmax(teacher_soft / reg_temperature, dim=1))
    return (1.0 - reg_alpha) * loss_ce + reg_alpha * loss_soft_regu * multiplier


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides:UserWarning")
def test_official_total_is_ce_plus_the_regularizer_times_alpha_multiplier():
    rng = np.random.default_rng(0)
    z = (2 * rng.normal(size=(6, 10))).astype(np.float64)
    y = rng.integers(0, 10, size=6)
    alpha, t, m = 0.1, 20.0, 100.0
    official = official_loss_kd_regularization(torch.tensor(z), torch.tensor(y), alpha, t, m).item()
    ours = (1 - alpha) * float(losses.cross_entropy(z, y)) + alpha * m * float(
        losses.tf_kd_virtual_teacher(z, y, temperature=t))
    np.testing.assert_allclose(ours, official, rtol=1e-5)


def test_regularizer_against_numpy_of_the_formula_other_settings():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(5, 4)), np.array([0, 3, 1, 2, 2])
    a, t = 0.7, 0.5
    p_d = np.full((5, 4), (1 - a) / 3)
    p_d[np.arange(5), y] = a
    q = np.exp(p_d / t) / np.exp(p_d / t).sum(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    kl = (q * (np.log(q) - log_p)).sum(-1)
    got = losses.tf_kd_virtual_teacher(z, y, correct_prob=a, temperature=t, reduction="none")
    np.testing.assert_allclose(np.asarray(got), kl / 4, rtol=1e-5)
    got = losses.tf_kd_virtual_teacher(z, y, correct_prob=a, temperature=t, class_mean=False, reduction="none")
    np.testing.assert_allclose(np.asarray(got), kl, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.virtual_teacher_probs(z, y, correct_prob=a)), p_d, rtol=1e-6)


def test_method_trains_in_a_chain_with_ce_and_reports_the_regularizer():
    _, student = tiny_models()
    batch = tiny_batch(batch_size=8)
    state = jaxkd.create(student=student, method=methods.parse("0.9 * ce + 10 * tf_kd_reg(temperature=20)"),
                         tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))
    logits = student.apply(jax.device_get(state.student.variables()), batch["image"], train=True).logits
    _, metrics = jaxkd.make_train_step()(state, batch)
    expected = losses.tf_kd_virtual_teacher(logits, batch["label"], temperature=20.0)
    np.testing.assert_allclose(float(metrics["tf_kd_reg"]), float(expected), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"correct_prob": 0.2}, "1/K"), ({"correct_prob": 1.5}, "correct_prob"), ({"temperature": 0.0}, "temperature"),
    ({"class_mean": 1}, "class_mean"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    z, y = np.zeros((2, 5)), np.array([0, 1])
    with pytest.raises(ValueError, match=match):
        losses.tf_kd_virtual_teacher(z, y, **kwargs)
    if match != "1/K":  # a ≤ 1/K needs the number of classes: the loss checks it
        with pytest.raises(ValueError, match=match):
            methods.tf_kd_reg(**kwargs)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        losses.tf_kd_virtual_teacher(np.zeros((2, 5)), np.array([0, 1, 2]))
