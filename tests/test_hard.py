"""HARD (Nix, Burg & Sinz, "HARD: Hard Augmentations for Robust Distillation", 2023): the affine warp against
PyTorch's ``affine_grid`` + ``grid_sample``, the identity-initialized augmentor, the gradient reversal, and
the min-max in one scalar — the augmentor's gradient is minus the discrepancy's (plus λ times the teacher
constraint's), the student's is the discrepancy's, both against float64 finite differences."""

import flax.linen as nn
import jax.flatten_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxkd import losses, methods, models
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.methods.logit.hard import augment, augmenter_theta
from jaxkd.methods.spatial import IDENTITY_AFFINE, affine_warp, reverse_gradient, scale_gradient
from jaxkd.participants import Participant


def torch_affine_warp(images, theta):
    """PyTorch's spatial transformer sampling (NCHW), the reference for the NHWC warp."""
    x = torch.tensor(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
    t = torch.tensor(np.asarray(theta, np.float64))
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


def test_affine_warp_is_pytorchs_affine_grid_and_grid_sample():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 5, 6, 2)).astype(np.float32)
    # Rotations, shears, zooms and shifts, some reaching outside the image (zero padding).
    theta = np.asarray(IDENTITY_AFFINE) + 0.4 * rng.normal(size=(3, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(affine_warp(images, theta), torch_affine_warp(images, theta), rtol=1e-5, atol=1e-5)


def test_the_identity_initialized_augmentor_returns_the_input():
    images = np.random.default_rng(1).normal(size=(4, 5, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(affine_warp(images, jnp.broadcast_to(IDENTITY_AFFINE, (4, 2, 3))), images, atol=1e-6)
    method = methods.hard(noise_dim=5)
    params = method.init(jax.random.PRNGKey(0), None).params["augmenter"]
    noise = np.random.default_rng(2).normal(size=(4, 5)).astype(np.float32)  # whatever the noise
    np.testing.assert_allclose(augment(params, images, noise), images, atol=1e-6)


def test_the_affine_offsets_are_bounded_and_have_slope_one_at_the_identity():
    params = {"kernel": 100.0 * np.ones((2, 6), np.float32), "bias": np.linspace(-50, 50, 6).astype(np.float32)}
    theta = augmenter_theta(params, np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32), max_offset=0.3)
    assert np.all(np.abs(np.asarray(theta) - np.asarray(IDENTITY_AFFINE)) <= 0.3 + 1e-6)
    small = {"kernel": np.zeros((2, 6), np.float32), "bias": 1e-4 * np.arange(6, dtype=np.float32)}
    np.testing.assert_allclose(augmenter_theta(small, np.zeros((1, 2), np.float32), max_offset=0.3)[0],
                               np.asarray(IDENTITY_AFFINE) + small["bias"].reshape(2, 3), rtol=1e-6, atol=1e-9)


def test_reverse_and_scale_gradient_are_the_identity_with_the_gradient_negated_or_scaled():
    x = jnp.array([0.3, -1.2, 2.0])
    f = lambda v: jnp.sum(jnp.sin(v) * v**2)
    np.testing.assert_allclose(reverse_gradient(x), x)
    np.testing.assert_allclose(jax.grad(lambda v: f(reverse_gradient(v)))(x), -jax.grad(f)(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: f(scale_gradient(v, 0.25)))(x), 0.25 * jax.grad(f)(x), rtol=1e-6)
    np.testing.assert_allclose(scale_gradient(x, 0.25), x)
    tree = {"a": x, "b": 2 * x}
    g = jax.grad(lambda t: f(reverse_gradient(t)["a"]) + f(t["b"]))(tree)
    np.testing.assert_allclose(g["a"], -jax.grad(f)(x), rtol=1e-6)


class Tiny(nn.Module):
    """A float64 classifier (tanh, so the finite differences see a smooth function)."""

    hidden: int
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train):
        del train
        h = jnp.tanh(nn.Dense(self.hidden, param_dtype=jnp.float64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes, param_dtype=jnp.float64, name="fc")(h)


def central_differences(f, x, eps=1e-6):
    """Float64 central differences of a scalar function of one flat vector, every coordinate at once."""
    basis = eps * jnp.eye(x.size, dtype=x.dtype)
    return jax.jit(lambda x: (jax.vmap(lambda d: f(x + d))(basis) - jax.vmap(lambda d: f(x - d))(basis)) / (2 * eps))(x)


@pytest.mark.parametrize("consistency, lr_scale", [(0.0, 1.0), (0.7, 0.3)])
def test_min_max_the_augmentor_ascends_the_discrepancy_and_the_student_descends_it(consistency, lr_scale):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        images = rng.normal(size=(4, 5, 5, 1))
        teacher, student = models.from_linen(Tiny(hidden=6)), models.from_linen(Tiny(hidden=4))
        t_vars = teacher.init(jax.random.PRNGKey(1), images)
        s_vars = student.init(jax.random.PRNGKey(2), images)
        method = methods.hard(temperature=2.0, teacher_consistency=consistency, noise_dim=3, max_offset=0.5,
                              augmenter_lr_scale=lr_scale)
        augmenter = {"kernel": 0.2 * rng.normal(size=(3, 6)), "bias": 0.2 * rng.normal(size=6)}  # not the identity
        key = jax.random.PRNGKey(4)
        noise = jax.random.normal(jax.random.split(key)[0], (4, 3), jnp.float32)  # the method's noise for `key`
        participants = (("student", Participant(student)), ("teacher", Participant(teacher)))
        t_clean = teacher.apply(t_vars, images, train=False)

        def method_loss(s_params, aug_params):
            inputs = LossInputs(outputs={"student": student.apply(s_vars, images, train=True), "teacher": t_clean},
                                batch={"image": images}, step=jnp.int32(0), participants=participants,
                                variables={"student": {"params": s_params}, "teacher": t_vars})
            return method.loss(MethodVars(params={"augmenter": aug_params}), inputs, key)[0]

        def warped(aug_params):
            return affine_warp(images, augmenter_theta(aug_params, noise, max_offset=0.5))

        # The two objectives, written plainly (no reversal): D(θ, φ) and C(φ).
        def discrepancy(s_params, aug_params):
            x = warped(aug_params)
            zt = teacher.apply(t_vars, x, train=False).logits
            zs = student.apply({"params": s_params}, x, train=True).logits
            return losses.kd(zs, zt, temperature=2.0)

        def teacher_shift(aug_params):
            zt = teacher.apply(t_vars, warped(aug_params), train=False).logits
            return losses.kd(zt, t_clean.logits, temperature=1.0)

        g_student, g_aug = jax.jit(jax.grad(method_loss, argnums=(0, 1)))(s_vars["params"], augmenter)
        flat_aug, unflatten_aug = jax.flatten_util.ravel_pytree(augmenter)
        fd_d_aug = central_differences(lambda a: discrepancy(s_vars["params"], unflatten_aug(a)), flat_aug)
        fd_c_aug = central_differences(lambda a: teacher_shift(unflatten_aug(a)), flat_aug)
        flat_g_aug = jax.flatten_util.ravel_pytree(g_aug)[0]
        assert flat_g_aug.dtype == jnp.float64
        np.testing.assert_allclose(flat_g_aug, lr_scale * (-fd_d_aug + consistency * fd_c_aug), rtol=1e-6, atol=1e-9)
        if consistency == 0.0:
            assert np.all(np.sign(flat_g_aug) == -np.sign(fd_d_aug))

        flat_s, unflatten_s = jax.flatten_util.ravel_pytree(s_vars["params"])
        fd_d_student = central_differences(lambda p: discrepancy(unflatten_s(p), augmenter), flat_s)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(g_student)[0], fd_d_student, rtol=1e-6, atol=1e-9)

        # The value is D + λ·C.
        np.testing.assert_allclose(method_loss(s_vars["params"], augmenter),
                                   discrepancy(s_vars["params"], augmenter) + consistency * teacher_shift(augmenter),
                                   rtol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(teacher_consistency=-0.1), "teacher_consistency"),
    (dict(noise_dim=0), "noise_dim"),
    (dict(max_offset=0.0), "max_offset"),
    (dict(augmenter_lr_scale=0.0), "augmenter_lr_scale"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.hard(**kwargs)


def test_inputs_that_are_not_images_and_bad_affine_maps_are_refused():
    student = models.get("mlp", num_classes=3, hidden_sizes=(4,))
    vectors = np.zeros((2, 7), np.float32)
    out = student.apply(student.init(jax.random.PRNGKey(0), vectors), vectors, train=False)
    inputs = LossInputs(outputs={"student": out, "teacher": out}, batch={"image": vectors}, step=jnp.int32(0),
                        participants=(("student", Participant(student)),))
    method = methods.hard()
    with pytest.raises(ValueError, match=r"augments \[batch, height, width, channels\] images"):
        method.loss(method.init(jax.random.PRNGKey(0), inputs), inputs, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="images"):
        affine_warp(vectors, jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="theta"):
        affine_warp(np.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3)))
