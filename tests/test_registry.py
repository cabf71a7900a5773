"""Every method in the registry is selectable by name, builds a train state and trains in the jitted step;
the README's method table is the registry's."""

import pathlib

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods
from tests.helpers import teacher_variables, tiny_batch, tiny_models

# Arguments a factory has no default for (the smallest valid spec of each such method).
REQUIRED_ARGS = {"taid": "total_steps=10", "ab": "alpha=0.5, beta=0.5", "sparse_kd": "k=2"}
TEACHER, STUDENT = tiny_models()
BATCH = tiny_batch()
TEACHER_VARS = teacher_variables(TEACHER, BATCH)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_registered_method_parses_builds_a_state_and_trains_one_jitted_step(name):
    method = methods.parse(f"{name}({REQUIRED_ARGS.get(name, '')})")
    batch = dict(BATCH)
    if method.meta_prefix is not None:
        batch.update({method.meta_prefix + k: v for k, v in tiny_batch(seed=1).items()})
    # Every participant the method reads: trained ones fresh (peers, online teachers), others frozen.
    participants = {
        name: jaxkd.Participant(TEACHER, None if name in method.trains else TEACHER_VARS, trains=name in method.trains)
        for name in method.participants
    }
    state = jaxkd.create(student=STUDENT, method=method, tx=optax.sgd(0.05), sample_batch=batch,
                         rng=jax.random.PRNGKey(0), participants=participants)
    before = jax.device_get(state.student.params)
    state, metrics = jaxkd.make_train_step()(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                                           jax.device_get(state.student.params)))
    assert any(changed), f"{name} did not change the student"


def test_registry_covers_every_factory_with_a_paper_and_existing_losses():
    for name, entry in methods.REGISTRY.items():
        assert entry.paper, name
        for loss in entry.losses:
            assert loss in jaxkd.losses.__all__, f"{name} names a loss that does not exist: {loss}"
    assert set(REQUIRED_ARGS) <= set(methods.REGISTRY)


def test_readme_method_table_is_the_registry():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert methods.method_table() in readme, "regenerate it: python -c 'import jaxkd; print(jaxkd.methods.method_table())'"


def test_user_methods_register_by_name():
    def my_kd(*, temperature: float = 2.0):
        return methods.kd(temperature=temperature, name="my_kd")

    methods.register("my_test_kd", my_kd)
    try:
        chain = methods.parse("ce + my_test_kd(temperature=3)")
        assert [m.name for m in chain.terms] == ["ce", "my_kd"]
        with pytest.raises(ValueError, match="already registered"):
            methods.register("my_test_kd", lambda: None)
    finally:
        del methods.REGISTRY["my_test_kd"]
