"""Logit methods in any roles (jaxkd/methods/base.py: ``LossInputs.output`` for the trained output,
``LossInputs.target`` for a gradient-stopped target; ``family="logits"`` in jaxkd/methods/registry.py).

For every method the registry lists in the logits family: ``m(student="peer", teacher="student")`` in a
mutual-learning state (student and peer both trained) trains the peer and sends no gradient to the
student through its loss; under the default roles a *trained* participant named ``"teacher"`` (online
distillation) gets no gradient either; the roles route each participant to the right argument (the value
equals the default-role method with the participants renamed); and the method declares whom it reads and
trains, so ``jaxkd.create`` refuses a frozen learner.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models
from jaxkd.methods import LossInputs, MethodVars
from jaxkd.methods.registry import LOGITS, REGISTRY

from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_models

#: Every registered logit method: a method joins this test by registering with family=LOGITS.
LOGIT_METHODS = sorted(name for name, entry in REGISTRY.items() if entry.family == LOGITS)
#: Hyperparameters some factories require (they have no default).
REQUIRED = {"alpha_beta_divergence": {"alpha": 0.5, "beta": 0.5}, "sparse_forward_kl": {"k": 3}, "taid": {"total_steps": 10}}

BATCH = tiny_batch()
MODELS = {
    "student": models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,)),
    "peer": models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(24,)),
    "teacher": models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32,)),
}
RNG = jax.random.PRNGKey(7)


def build(name, **roles):
    return REGISTRY[name].factory(**REQUIRED.get(name, {}), **roles)


def trained_state(method, other):
    """A state whose student and ``other`` ("peer" or "teacher") are both trained, freshly initialized."""
    return jaxkd.create(student=MODELS["student"], method=method, tx=optax.sgd(0.1), sample_batch=BATCH,
                        rng=jax.random.PRNGKey(0), participants={other: jaxkd.Participant(MODELS[other])})


def loss_grads(method, state):
    """``d loss / d params`` of every trained participant, the way the train step differentiates: each
    trained participant's forward in train mode inside the differentiated function."""
    chain = state.method
    trained = state.trained

    def loss(params):
        outputs = {
            name: MODELS[name].apply({**v.variables(), "params": params[name]}, BATCH["image"], train=True)
            for name, v in trained.items()
        }
        inputs = LossInputs(outputs=outputs, batch=BATCH, step=jnp.zeros((), jnp.int32),
                            participants=state.participants)
        value, _ = chain.loss(MethodVars(state.method_vars.params, state.method_vars.state), inputs, RNG)
        return value

    return jax.grad(loss)({name: v.params for name, v in trained.items()})


def assert_zero(tree, who):
    for leaf in jax.tree.leaves(tree):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0, err_msg=who)


def assert_nonzero(tree, who):
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree)), f"{who} gets no gradient"


def test_the_family_holds_the_logit_methods_and_each_takes_the_roles():
    # The methods are in the family (a family emptied by mistake would make the tests below vacuous).
    assert {"kd", "dkd", "nkd", "dist", "pld", "swing", "sparse_forward_kl"} <= set(LOGIT_METHODS)
    for name in LOGIT_METHODS:
        keywords = inspect.signature(REGISTRY[name].factory).parameters
        assert {"student", "teacher"} <= set(keywords), name


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_a_peer_learns_from_the_student_and_never_trains_it(name):
    method = build(name, student="peer", teacher="student")
    assert method.needs.participants == ("peer",) and method.needs.trained == ("peer",)
    grads = loss_grads(method, trained_state(method, "peer"))
    assert_zero(grads["student"], f"{name}: the student (the target)")
    assert_nonzero(grads["peer"], f"{name}: the peer (the learner)")


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_a_trained_teacher_gets_no_gradient_from_its_student_under_the_default_roles(name):
    method = build(name)
    assert method.needs.participants == ("teacher",) and method.needs.trained == ()
    grads = loss_grads(method, trained_state(method, "teacher"))
    assert_zero(grads["teacher"], f"{name}: the online teacher (the target)")
    assert_nonzero(grads["student"], f"{name}: the student (the learner)")


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_the_roles_route_each_participant_to_its_argument(name):
    # m(student="peer", teacher="student") on {student: A, peer: B} is m() on {student: B, teacher: A}: the
    # same loss with the participants renamed, so neither role is read from the wrong participant.
    a, b = (MODELS[n].apply(MODELS[n].init(jax.random.PRNGKey(i), BATCH["image"]), BATCH["image"], train=False)
            for i, n in ((1, "student"), (2, "peer")))
    swapped = build(name, student="peer", teacher="student")
    default = build(name)
    renamed, plain = LossInputs.of(a, batch=BATCH, peer=b), LossInputs.of(b, a, BATCH)
    got, _ = swapped.loss(swapped.init(RNG, renamed), renamed, RNG)
    want, _ = default.loss(default.init(RNG, plain), plain, RNG)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize("name", ["dkd", "sparse_forward_kl"])
def test_a_frozen_learner_is_refused(name):
    method = build(name, student="peer", teacher="student")
    frozen_peer = jaxkd.Participant(MODELS["peer"], MODELS["peer"].init(jax.random.PRNGKey(3), BATCH["image"]),
                                    trains=False)
    with pytest.raises(ValueError, match="trains participant 'peer'.*frozen"):
        jaxkd.create(student=MODELS["student"], method=method, tx=optax.sgd(0.1), sample_batch=BATCH,
                     rng=jax.random.PRNGKey(0), participants={"peer": frozen_peer})


def test_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family must be one of"):
        methods.register("pixel_kd", methods.kd, family="pixels")
    assert "pixel_kd" not in REGISTRY


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_one_role_per_participant(name):
    with pytest.raises(ValueError, match="must be different participants"):
        build(name, student="peer", teacher="peer")
    with pytest.raises(ValueError, match="teacher must name a participant"):
        build(name, teacher="")


def test_mutual_learning_with_a_logit_method_trains_both_and_each_only_through_its_own_term():
    # DML built from DKD in both directions: one real train step moves both networks; with the peer's
    # term alone, the student does not move at all (its gradient is exactly zero, sgd keeps it).
    both = (methods.ce() + methods.ce(participant="peer", name="peer_ce")
            + methods.dkd(teacher="peer").named("dkd_student")
            + methods.dkd(student="peer", teacher="student").named("dkd_peer"))
    peer_term = methods.dkd(student="peer", teacher="student")
    step = jaxkd.make_train_step()
    for method, moves in ((both, ("student", "peer")), (peer_term, ("peer",))):
        state = jaxkd.create(student=MODELS["student"], method=method, tx=optax.sgd(0.1), sample_batch=BATCH,
                             rng=jax.random.PRNGKey(0), participants={"peer": jaxkd.Participant(MODELS["peer"])})
        before = jax.device_get(state.trained)
        state, metrics = step(state, BATCH)
        after = jax.device_get(state.trained)
        for name in ("student", "peer"):
            kernel_moved = not np.array_equal(before[name].params["dense1"]["kernel"],
                                              after[name].params["dense1"]["kernel"])
            assert kernel_moved == (name in moves), (method.name, name)


def test_a_role_the_state_lacks_is_refused_listing_the_participants():
    teacher, student = tiny_models()
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"reads participant 'peer', but the train state has participants "
                                         r"\['student', 'teacher'\]"):
        jaxkd.create(student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
                     method=methods.ce() + methods.dkd(teacher="peer"), tx=optax.sgd(0.1), sample_batch=batch,
                     rng=jax.random.PRNGKey(0))
