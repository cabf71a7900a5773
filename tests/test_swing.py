"""Swing distillation (jaxkd/losses/logit/swing.py, jaxkd/methods/logit/swing.py) against NumPy: the noiseless,
constant-temperature limit (Hinton KD) and the documented per-example temperature and log-space noise;
randomness only from the key, argument checks, and the method's use of the step key and privacy scores.

Gradients, bfloat16, jit == eager, classes excluded on both sides, NaN/+inf propagation, nonnegativity
and shift invariance are checked in tests/test_loss_contract.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses, methods
from jaxkd.methods import LossInputs
from jaxkd.models import Outputs

from tests.numpy_reference import np_kl, np_softmax, rand_logits


def test_without_noise_and_with_a_constant_temperature_it_is_hinton_kd():
    zs, zt = rand_logits(29), rand_logits(30)
    out = losses.swing(zs, zt, jax.random.PRNGKey(0), base_temperature=3.0, noise_scale=0.0, reduction="none")
    np.testing.assert_allclose(out, 9 * np_kl(np_softmax(zt / 3), np_softmax(zs / 3)), rtol=1e-5)


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_matches_numpy_with_per_example_temperature_and_noise(noise):
    zs, zt = rand_logits(31), rand_logits(32)
    r = np.array([0.0, 0.25, 1.0, 0.5, 0.75, 0.1], np.float32)
    key = jax.random.PRNGKey(3)
    sample = jax.random.normal if noise == "gaussian" else jax.random.laplace
    xi = np.asarray(sample(key, (6, 5), jnp.float32), np.float64)
    T = (2.0 + (6.0 - 2.0) * r)[:, None]
    ref = T[:, 0] ** 2 * np_kl(np_softmax(zt / T + 0.3 * xi), np_softmax(zs / T))
    out = losses.swing(zs, zt, key, base_temperature=2.0, max_temperature=6.0, privacy_scores=r, noise_scale=0.3,
                          noise=noise, reduction="none")
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_randomness_comes_only_from_the_key():
    zs, zt = rand_logits(33), rand_logits(34)
    f = jax.jit(lambda s, t, k: losses.swing(s, t, k, noise_scale=0.5, noise="laplace"))
    a, b = f(zs, zt, jax.random.PRNGKey(7)), f(zs, zt, jax.random.PRNGKey(7))
    assert float(a) == float(b) != float(f(zs, zt, jax.random.PRNGKey(8)))


def test_bad_arguments_raise():
    z, key = np.zeros((2, 3), np.float32), jax.random.PRNGKey(0)
    for bad, match in [
        (lambda: losses.swing(z, z, key, base_temperature=0.0), "base_temperature"),
        (lambda: losses.swing(z, z, key, max_temperature=1e30), "max_temperature"),
        (lambda: losses.swing(z, z, key, noise_scale=-0.1), "noise_scale"),
        (lambda: losses.swing(z, z, key, noise="uniform"), "noise"),
        (lambda: losses.swing(z, z, key, privacy_scores=np.array([0.5, 1.5])), "privacy_scores"),
        (lambda: losses.swing(z, z, key, privacy_scores=np.zeros(3)), "privacy_scores"),
        (lambda: losses.swing(z, np.zeros((2, 4)), key), "number of classes"),
        (lambda: methods.swing(noise_scale=-1.0), "noise_scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_method_uses_the_step_key_and_the_privacy_scores():
    zs, zt = rand_logits(35), rand_logits(36)
    inputs = LossInputs.of(Outputs(jnp.asarray(zs), {}, {}), Outputs(jnp.asarray(zt), {}, {}), {},
                        jnp.zeros((), jnp.int32))
    run = lambda method, seed=1, x=inputs: float(method.loss(method.init(jax.random.PRNGKey(0), x), x,
                                                             jax.random.PRNGKey(seed))[0])
    noisy = methods.swing(noise_scale=0.5)
    assert run(noisy, 1) == run(noisy, 1) != run(noisy, 2)
    scored = methods.swing(noise_scale=0.0, base_temperature=2.0, max_temperature=8.0, privacy_key="privacy")
    assert scored.needs.batch_keys == ("privacy",)
    with pytest.raises(ValueError, match="privacy"):
        run(scored)
    r = np.linspace(0, 1, 6).astype(np.float32)
    T = (2.0 + 6.0 * r)[:, None]
    expected = np.mean(T[:, 0] ** 2 * np_kl(np_softmax(zt / T), np_softmax(zs / T)))
    np.testing.assert_allclose(run(scored, x=inputs.replace(batch={"privacy": r})), expected, rtol=1e-5)
