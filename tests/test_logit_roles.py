"""Logit methods in any roles (jaxkd/methods/base.py: ``LossInputs.output`` for the trained output,
``LossInputs.target`` for a gradient-stopped target; ``contract=LOGIT_ROLES`` in jaxkd/methods/registry.py).

For every method the registry lists under the logit-roles contract (and, for a factory with a token variant, that
variant too): ``m(student="peer", teacher="student")`` in a mutual-learning state (student and peer both
trained) trains the peer and sends exactly no gradient to the student through its loss; under the default
roles a *trained* participant named ``"teacher"`` (online distillation) gets no gradient either; the roles
route each participant to the right argument (the value equals the default-role method with the
participants renamed, and equals the loss function called directly on the peer's and the student's logits
with hyper-parameters under which swapped arguments give another value); and the method declares whom it
reads and trains, so ``jaxkd.create`` refuses a frozen learner.

Each method runs on the models its registry entry's ``inputs`` asks for: MLPs (``"classifier"``), CIFAR
ResNets with stage maps (``"feature_maps"``) or tiny causal LMs (``"tokens"``).
"""

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.losses.lm.tokens import shift_logits
from jaxkd.methods import LossInputs, MethodVars
from jaxkd.methods.registry import LOGIT_ROLES, REGISTRY

from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_image_batch, tiny_models

#: Every registered logit method: a method joins these tests by registering with contract=LOGIT_ROLES.
LOGIT_METHODS = sorted(name for name, entry in REGISTRY.items() if entry.contract == LOGIT_ROLES)
#: (name, extra spec arguments): every logit method as registered, and the token variant of those whose
#: factory has one (``taid(tokens=True)``).
CASES = [(name, "") for name in LOGIT_METHODS] + [
    (name, "tokens=True") for name in LOGIT_METHODS if "tokens" in inspect.signature(REGISTRY[name].factory).parameters
]
CASE_IDS = [name + ("[tokens]" if extra else "") for name, extra in CASES]
RNG = jax.random.PRNGKey(7)


class Setup(NamedTuple):
    """Models for the participants ``student``, ``peer`` and ``teacher``, what they read, and a batch."""

    models: dict
    input: Any
    batch: dict


def _with_meta_batch(batch, meta):
    # TGeo-KD's held-out meta batch rides along under "meta_" (other methods ignore it).
    return {**batch, **{"meta_" + k: v for k, v in meta.items()}}


@functools.cache
def setup(kind: str) -> Setup:
    if kind == "classifier":
        widths = {"student": 16, "peer": 24, "teacher": 32}
        return Setup({n: models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(w,)) for n, w in widths.items()},
                     "image", _with_meta_batch(tiny_batch(), tiny_batch(seed=1)))
    if kind == "feature_maps":
        return Setup({n: models.get("resnet8", num_classes=NUM_CLASSES) for n in ("student", "peer", "teacher")},
                     "image", _with_meta_batch(tiny_image_batch(), tiny_image_batch(seed=1)))
    assert kind == "tokens", kind
    from jaxkd.batch import TOKEN_NORMALIZER, token_normalizer
    from jaxkd.models import lm as lm_models

    sizes = {"student": 16, "peer": 24, "teacher": 32}
    lms = {n: lm_models.lm(lm_models.LMConfig(vocab_size=128, d_model=d, num_layers=1, num_heads=2, d_ff=32, max_len=8))
           for n, d in sizes.items()}
    rng = np.random.default_rng(0)
    mask = np.arange(8)[None] < np.array([[8], [6], [7], [5]])
    batch = {"tokens": rng.integers(32, 128, size=(4, 8)).astype(np.int32), "mask": mask,
             TOKEN_NORMALIZER: token_normalizer(mask[:, 1:] & mask[:, :-1])}
    return Setup(lms, ("tokens", "mask"), batch)


def kind_of(name: str, extra: str = "") -> str:
    return "tokens" if "tokens=True" in extra else REGISTRY[name].inputs


def build(name: str, extra: str = "", **roles) -> jaxkd.methods.Method:
    """The method from its registry entry's smallest valid spec (plus ``extra`` and the roles)."""
    args = [a for a in (REGISTRY[name].example, extra, *(f"{k}={v!r}" for k, v in roles.items())) if a]
    return methods.parse(f"{name}({', '.join(args)})")


def make_state(method, kind: str, names=("student", "peer"), variables=None, model_of=None):
    """A state whose participants ``names`` are all trained: fresh, or started from ``variables`` by name;
    ``model_of`` maps a participant to the setup model it runs (default: its own name's)."""
    s = setup(kind)
    model_of = model_of or {}
    variables = variables or {}
    participants = {n: jaxkd.Participant(s.models[model_of.get(n, n)], variables.get(n), input=s.input) for n in names}
    return jaxkd.create(participants=participants, method=method, tx=optax.sgd(0.1), sample_batch=s.batch,
                        rng=jax.random.PRNGKey(0))


def step_inputs(state, batch, params):
    """The loss inputs of a train step with the trained participants at ``params`` (``None``: the state's):
    each one's forward in train mode, its differentiated variables in ``LossInputs.variables``."""
    params = params if params is not None else {n: v.params for n, v in state.trained.items()}
    variables = {n: {**v.variables(), "params": params[n]} for n, v in state.trained.items()}
    outputs = {}
    for n, v in variables.items():
        p = state.participant(n)
        outputs[n] = p.model.apply(v, p.model_input(batch, name=n), train=True, rngs={"dropout": RNG})
    return LossInputs(outputs=outputs, batch=batch, step=jnp.zeros((), jnp.int32), variables=variables,
                      participants=state.participants, label_key=state.label_key)


def loss_grads(state, batch):
    """``d loss / d params`` of every trained participant, the way the train step differentiates: each
    trained participant's forward in train mode inside the differentiated function."""
    return loss_value_and_grads(state, batch)[1]


def loss_value_and_grads(state, batch):
    """The loss value and :func:`loss_grads`, from one compiled program."""

    def loss(params):
        value, _ = state.method.loss(state.method_vars, step_inputs(state, batch, params), RNG)
        return value

    return jax.jit(jax.value_and_grad(loss))({n: v.params for n, v in state.trained.items()})


def assert_zero(tree, who):
    for leaf in jax.tree.leaves(tree):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0, err_msg=who)


def assert_nonzero(tree, who):
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree)), f"{who} gets no gradient"


def test_the_contract_holds_the_logit_methods_and_each_takes_the_roles():
    # The methods declare the contract (a contract emptied by mistake would make the tests below vacuous).
    assert {"kd", "dkd", "nkd", "dist", "pld", "swing", "sparse_forward_kl", "kd_dp", "tgeo_kd", "kd3", "dho", "dhkd",
            "ofa", "diswot", "lelp", "token_kd", "sparse_token_kd", "gkd"} <= set(LOGIT_METHODS)
    assert ("taid", "tokens=True") in CASES
    for name in LOGIT_METHODS:
        keywords = inspect.signature(REGISTRY[name].factory).parameters
        assert {"student", "teacher"} <= set(keywords), name


# The three tests below share their states and compiled programs per case (module-wide caches, so a case
# builds two states, not five, and compiles one value-and-gradient program per state): the swapped-roles
# state m(student="peer", teacher="student") on {student: A, peer: B}, and the default-roles state m() on
# {student: B, teacher: A} (the same networks renamed: the student role runs the peer's model at B, the
# trained teacher the student's model at A). States are never stepped, so sharing them is safe.


@functools.cache
def swapped_state(name: str, extra: str):
    return make_state(build(name, extra, student="peer", teacher="student"), kind_of(name, extra), ("student", "peer"))


@functools.cache
def default_state(name: str, extra: str):
    swapped = swapped_state(name, extra)
    a, b = (swapped.trained[n].variables() for n in ("student", "peer"))
    return make_state(build(name, extra), kind_of(name, extra), ("student", "teacher"),
                      variables={"student": b, "teacher": a}, model_of={"student": "peer", "teacher": "student"})


@functools.cache
def value_and_grads(name: str, extra: str, roles: str):
    """The loss value and ``d loss / d params`` of every trained participant of the case's ``roles`` state
    (``"swapped"`` or ``"default"``), from one compiled program."""
    state = (swapped_state if roles == "swapped" else default_state)(name, extra)
    value, grads = loss_value_and_grads(state, setup(kind_of(name, extra)).batch)
    return float(value), grads


@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_a_peer_learns_from_the_student_and_never_trains_it(name, extra):
    method = build(name, extra, student="peer", teacher="student")
    assert method.needs.participants == ("peer",) and method.needs.trained == ("peer",)
    _, grads = value_and_grads(name, extra, "swapped")
    assert_zero(grads["student"], f"{name}: the student (the target)")
    assert_nonzero(grads["peer"], f"{name}: the peer (the learner)")


@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_a_trained_teacher_gets_no_gradient_from_its_student_under_the_default_roles(name, extra):
    method = build(name, extra)
    assert method.needs.participants == ("teacher",) and method.needs.trained == ()
    _, grads = value_and_grads(name, extra, "default")
    assert_zero(grads["teacher"], f"{name}: the online teacher (the target)")
    assert_nonzero(grads["student"], f"{name}: the student (the learner)")


@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_the_roles_route_each_participant_to_its_argument(name, extra):
    # m(student="peer", teacher="student") on {student: A, peer: B} is m() on {student: B, teacher: A}: the
    # same loss with the participants renamed, so neither role is read from the wrong participant.
    swapped, _ = value_and_grads(name, extra, "swapped")
    default, _ = value_and_grads(name, extra, "default")
    np.testing.assert_allclose(swapped, default, rtol=1e-6)


# ---- The value in swapped roles is the loss function of (peer logits, student logits) ------------------


class Ctx(NamedTuple):
    """What a direct call may read: the peer's (learner) and the student's (target) outputs, the batch,
    the method's variables and the key its loss got."""

    peer: Any
    student: Any
    batch: dict
    vars: MethodVars
    rng: jax.Array

    @property
    def zs(self):
        return self.peer.logits

    @property
    def zt(self):
        return self.student.logits

    @property
    def labels(self):
        return self.batch["label"]

    def tokens(self):
        """(shifted learner logits, shifted target logits, target mask, normalizer) of an LM batch."""
        from jaxkd.methods.lm.tokens import lm_targets

        _, target_mask, normalizer = lm_targets(self.batch)
        return shift_logits(self.zs), shift_logits(self.zt), target_mask, normalizer


def _divergence(fn, **kw):
    return {"kwargs": dict(temperature=2.0, **kw), "call": lambda c: fn(c.zs, c.zt, temperature=2.0, **kw)}


def _terms_sum(terms):
    return terms[0] + terms[1]


def _dho(c):
    from jaxkd.methods.heads import feature_head

    ce, kd = losses.dho_terms(c.zs, feature_head(c.vars.params["kd_head"], c.peer, "pooled"), c.zt, c.labels,
                              temperature=3.0)
    return 0.7 * ce + 0.4 * kd


def _dhkd(c):
    from jaxkd.methods.heads import feature_head

    ce, bkl = losses.dhkd_terms(c.zs, feature_head(c.vars.params["aux_head"], c.peer, "pooled"), c.zt, c.labels,
                                temperature=3.0)
    return 0.7 * ce + 0.4 * bkl


def _kd3(c):
    # Feature, classifier and alignment terms weigh 0: the value is the selection-weighted KD.
    selected = losses.kd3_selection(c.zs, c.zt, threshold=0.3, teacher_weight=0.7)
    e = c.student.features["pooled"]
    kd, _ = losses.kd3_terms(c.zs, c.zt, e, e, temperature=3.0, weights=selected)
    return kd


def _kd_dp(c):
    # A fresh state: the peer's initial variables are its current ones, the frozen copy runs in eval mode.
    initial = c.vars.state["initial_student"]
    x = c.batch["image"]
    peer_model = setup("classifier").models["peer"]
    initial_logits = peer_model.apply(initial, x, train=False).logits
    return losses.kd_dp(c.zs, c.zt, initial_logits, c.labels, temperature=2.0)


LELP_PROJECTIONS = np.random.default_rng(3).normal(size=(NUM_CLASSES, 3, 16 + 1)).astype(np.float32)


def _lelp(c):
    from jaxkd.methods.heads import dense

    return losses.lelp(dense(c.vars.params["head"], c.peer.features["pooled"]), c.zt, c.student.features["pooled"],
                       LELP_PROJECTIONS, temperature=2.0, subclass_temperature=0.5)


def _tgeo_kd(c):
    from jaxkd.methods.logit.tgeo_kd import _fusion_apply

    ratio = _fusion_apply(c.vars.params["fusion"], losses.fusion_inputs(c.zs, c.zt, c.labels))
    return {"student_loss": losses.tgeo_kd(c.zs, c.zt, c.labels, ratio, temperature=2.0)}


def _diswot(c):
    relation = losses.diswot_relation(c.peer.features["stage3"], c.student.features["stage3"])
    semantic = losses.diswot_semantic(c.zs, c.peer.features["pooled"], c.zt, c.student.features["pooled"], c.labels)
    return 0.3 * relation + 2.0 * semantic


def _sparse_token_kd(c):
    s, _, target_mask, normalizer = c.tokens()
    indices, log_probs = losses.topk_teacher(c.zt, 3, temperature=2.0)
    return losses.sparse_forward_kl(s, indices[:, :-1], log_probs[:, :-1], temperature=2.0, tail="drop",
                                    mask=target_mask, normalizer=normalizer)


def _dac_kl(c):
    from jaxkd.methods.lm.dac_kl import identifier_spans

    s, t, target_mask, normalizer = c.tokens()
    spans = identifier_spans(c.batch["tokens"][:, 1:], target_mask)
    return (losses.dac_kl(s, t, lower=0.1, upper=0.9, mask=target_mask, normalizer=normalizer)
            + 0.5 * losses.span_correlation_loss(s, t, spans, target_mask))


def _infigfusion(c):
    s, t, target_mask, _ = c.tokens()  # a mean over sequences: no token normalizer
    return losses.infigfusion(s, t, k=4, values="probs", mask=target_mask)


def _token(fn, **kw):
    def call(c):
        s, t, target_mask, normalizer = c.tokens()
        return fn(s, t, mask=target_mask, normalizer=normalizer, **kw)
    return call


#: name (or name[tokens]) -> the factory's arguments and the direct call of its loss functions on the
#: peer's (learner) and the student's (target) logits. The arguments make each loss non-symmetric where the
#: loss allows it (a swapped call then gives another value); js_divergence, total_variation, margin_mse and
#: infigfusion are symmetric in their two arguments by definition, so for them the check only shows that
#: the peer and the student are the participants read.
DIRECT: dict[str, dict[str, Any]] = {
    "alpha_beta_divergence": _divergence(losses.alpha_beta_divergence, alpha=0.3, beta=0.6),
    "bdkd": {"kwargs": dict(temperature=3.0), "call": lambda c: _terms_sum(losses.bdkd_terms(c.zs, c.zt, temperature=3.0))},
    "dhkd": {"kwargs": dict(temperature=3.0, ce_weight=0.7, kd_weight=0.4), "call": _dhkd},
    "dho": {"kwargs": dict(temperature=3.0, ce_weight=0.7, kd_weight=0.4), "call": _dho},
    "dist": {"kwargs": dict(beta=2.0, gamma=0.5, temperature=2.0),
             "call": lambda c: 4.0 * (lambda t: 2.0 * t[0] + 0.5 * t[1])(losses.dist_terms(c.zs, c.zt, temperature=2.0))},
    "diswot": {"kwargs": dict(relation_weight=0.3, semantic_weight=2.0), "call": _diswot},
    "dkd": {"kwargs": dict(alpha=0.5, beta=3.0, temperature=2.0),
            "call": lambda c: (lambda t: 0.5 * t[0] + 3.0 * t[1])(losses.dkd_terms(c.zs, c.zt, c.labels, temperature=2.0))},
    "forward_kl": _divergence(losses.forward_kl),
    "generalized_jsd": _divergence(losses.generalized_jsd, beta=0.3),
    "gkd": {"kwargs": dict(lmbda=0.0, beta=0.3, temperature=2.0, prompt_length=3),
            "call": _token(losses.generalized_jsd, beta=0.3, temperature=2.0)},
    "js_divergence": _divergence(losses.js_divergence),
    "kd": _divergence(losses.kd),
    "kd3": {"kwargs": dict(temperature=3.0, threshold=0.3, teacher_weight=0.7, feature_weight=0.0, classifier_weight=0.0,
                           alignment_weight=0.0), "call": _kd3},
    "kd_dp": {"kwargs": dict(temperature=2.0), "call": _kd_dp},
    "kd_ls": _divergence(losses.kd_ls),
    "lelp": {"kwargs": dict(projections=LELP_PROJECTIONS, temperature=2.0, subclass_temperature=0.5), "call": _lelp},
    "listwise_kd": {"kwargs": dict(temperature=2.0, teacher_temperature=0.5),
                    "call": lambda c: losses.listwise_kd(c.zs, c.zt, temperature=2.0, teacher_temperature=0.5)},
    "margin_mse": {"kwargs": {}, "call": lambda c: losses.margin_mse(c.zs, c.zt)},
    "nkd": {"kwargs": dict(temperature=2.0, gamma=0.7),
            "call": lambda c: _terms_sum(losses.nkd_terms(c.zs, c.zt, c.labels, temperature=2.0, gamma=0.7))},
    "ofa": {"kwargs": dict(branch_weight=0.0, logit_weight=0.7, eps=(1.0, 1.0, 1.0, 1.5), temperature=2.0),
            "call": lambda c: 0.7 * losses.ofa(c.zs, c.zt, c.labels, eps=1.5, temperature=2.0)},
    "pld": {"kwargs": dict(teacher_temperature=2.0),
            "call": lambda c: losses.pld(c.zs, c.zt, c.labels, teacher_temperature=2.0)},
    "reverse_kl": _divergence(losses.reverse_kl),
    "sinkd": {"kwargs": dict(temperature=2.0, epsilon=0.2, iterations=5),
              "call": lambda c: losses.sinkd(c.zs, c.zt, temperature=2.0, epsilon=0.2, iterations=5)},
    "skew_kl": _divergence(losses.skew_kl, alpha=0.3),
    "skew_reverse_kl": _divergence(losses.skew_reverse_kl, alpha=0.3),
    "sparse_forward_kl": {"kwargs": dict(k=2, tail="bucket", temperature=2.0),
                          "call": lambda c: losses.sparse_forward_kl(
                              c.zs, *losses.topk_teacher(c.zt, 2, temperature=2.0), temperature=2.0, tail="bucket")},
    "topk_generalized_jsd": _divergence(losses.topk_generalized_jsd, k=2, beta=0.3, support="union"),
    "topk_reverse_kl": {"kwargs": dict(k=2, tail="drop", temperature=2.0),
                        "call": lambda c: losses.topk_generalized_jsd(c.zs, c.zt, k=2, beta=1.0, tail="drop",
                                                                      temperature=2.0)},
    "sparse_token_kd": {"kwargs": dict(k=3, tail="drop", temperature=2.0), "call": _sparse_token_kd},
    "swing": {"kwargs": dict(base_temperature=2.0, noise_scale=0.3),
              "call": lambda c: losses.swing(c.zs, c.zt, c.rng, base_temperature=2.0, noise_scale=0.3)},
    "taid": {"kwargs": dict(total_steps=10, t_start=0.3), "call": lambda c: losses.taid(c.zs, c.zt, t=c.vars.state.t)},
    "taid[tokens]": {"kwargs": dict(total_steps=10, t_start=0.3, tokens=True),
                     "call": lambda c: _token(losses.taid, t=c.vars.state.t)(c)},
    "tgeo_kd": {"kwargs": dict(temperature=2.0), "call": _tgeo_kd},
    "token_kd": {"kwargs": dict(divergence="skew_kl", alpha=0.3, temperature=2.0),
                 "call": _token(losses.skew_kl, alpha=0.3, temperature=2.0)},
    "total_variation": _divergence(losses.total_variation),
    "dac_kl": {"kwargs": dict(lower=0.1, upper=0.9, span_weight=0.5), "call": _dac_kl},
    "infigfusion": {"kwargs": dict(k=4, values="probs"), "call": _infigfusion},
}


@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_the_value_in_swapped_roles_is_the_loss_of_the_peer_and_the_student_logits(name, extra):
    key = name + ("[tokens]" if extra else "")
    assert key in DIRECT, f"{key} is a logit method: add its direct loss call to DIRECT"
    entry = DIRECT[key]
    kind = kind_of(name, extra)
    method = REGISTRY[name].factory(**entry["kwargs"], student="peer", teacher="student")
    state = make_state(method, kind, ("student", "peer"))
    batch = setup(kind).batch

    @jax.jit  # one compiled program for the method's loss and the direct call (op by op, each primitive compiles)
    def both():
        inputs = step_inputs(state, batch, None)
        member = MethodVars(state.method_vars.params[method.name], state.method_vars.state[method.name])
        value, aux = method.loss(member, inputs, RNG)
        want = entry["call"](Ctx(inputs.outputs["peer"], inputs.outputs["student"], batch, member, RNG))
        return {"": value, **aux.metrics}, want

    got, want = both()
    for metric, expected in (want.items() if isinstance(want, dict) else (("", want),)):
        np.testing.assert_allclose(float(got[metric]), float(expected), rtol=1e-5, atol=1e-7, err_msg=f"{key} {metric}")


# ---- Multi-teacher methods: a student role and a tuple of teachers -------------------------------------


@pytest.mark.parametrize("name,kind", [("multi_teacher_kd", "classifier"), ("fusellm", "tokens")])
def test_a_peer_learns_from_several_trained_teachers_and_trains_none(name, kind):
    method = REGISTRY[name].factory(student="peer", teachers=("student", "teacher"))
    assert set(method.needs.participants) == {"peer", "teacher"} and method.needs.trained == ("peer",)
    state = make_state(method, kind, ("student", "peer", "teacher"))
    grads = loss_grads(state, setup(kind).batch)
    assert_zero(grads["student"], f"{name}: the student (a target)")
    assert_zero(grads["teacher"], f"{name}: the teacher (a target)")
    assert_nonzero(grads["peer"], f"{name}: the peer (the learner)")


def test_multi_teacher_kd_in_roles_is_its_loss_of_the_peer_and_the_teachers_logits():
    method = methods.multi_teacher_kd(student="peer", teachers=("student", "teacher"), teacher_weights=(0.8, 0.2),
                                      temperature=2.0)
    state = make_state(method, "classifier", ("student", "peer", "teacher"))
    batch = setup("classifier").batch
    inputs = step_inputs(state, batch, None)
    value, _ = method.loss(MethodVars(), inputs, RNG)
    zt = jnp.stack([inputs.outputs["student"].logits, inputs.outputs["teacher"].logits], axis=-2)
    want = losses.multi_teacher_kd(inputs.outputs["peer"].logits, zt, teacher_weights=(0.8, 0.2), temperature=2.0)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be one of its own teachers"):
        methods.multi_teacher_kd(student="peer", teachers=("peer", "teacher"))


@pytest.mark.parametrize("name", ["dkd", "sparse_forward_kl", "kd_dp"])
def test_a_frozen_learner_is_refused(name):
    method = build(name, student="peer", teacher="student")
    s = setup("classifier")
    frozen_peer = jaxkd.Participant(s.models["peer"], s.models["peer"].init(jax.random.PRNGKey(3), s.batch["image"]),
                                    trains=False)
    with pytest.raises(ValueError, match="trains participant 'peer'.*frozen"):
        jaxkd.create(student=s.models["student"], method=method, tx=optax.sgd(0.1), sample_batch=s.batch,
                     rng=jax.random.PRNGKey(0), participants={"peer": frozen_peer})


def test_an_unknown_contract_is_refused():
    with pytest.raises(ValueError, match="contract must be one of"):
        methods.register("pixel_kd", methods.kd, contract="pixels")
    assert "pixel_kd" not in REGISTRY


@pytest.mark.parametrize("name", ["kd", "dkd", "kd3", "token_kd"])
def test_one_role_per_participant(name):
    with pytest.raises(ValueError, match="must be different participants"):
        REGISTRY[name].factory(student="peer", teacher="peer")
    with pytest.raises(ValueError, match="teacher must name a participant"):
        REGISTRY[name].factory(teacher="")


def test_mutual_learning_with_a_logit_method_trains_both_and_each_only_through_its_own_term():
    # DML built from DKD in both directions: one real train step moves both networks; with the peer's
    # term alone, the student does not move at all (its gradient is exactly zero, sgd keeps it).
    both = (methods.ce() + methods.ce(participant="peer", name="peer_ce")
            + methods.dkd(teacher="peer").named("dkd_student")
            + methods.dkd(student="peer", teacher="student").named("dkd_peer"))
    peer_term = methods.dkd(student="peer", teacher="student")
    step = jaxkd.make_train_step()
    batch = setup("classifier").batch
    for method, moves in ((both, ("student", "peer")), (peer_term, ("peer",))):
        state = make_state(method, "classifier", ("student", "peer"))
        before = jax.device_get(state.trained)
        state, metrics = step(state, batch)
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


#: The on-policy and preference LM methods: the learner samples (or is scored on) sequences inside the step.
ON_POLICY = ["adpa", "distillm", "iw_opd", "llava_mod", "minillm", "preference_kd", "seqkd"]


@pytest.mark.parametrize("name", ON_POLICY)
def test_on_policy_methods_take_roles_and_never_train_the_target(name):
    # The learner in the student role samples and is trained; the target (here the trained "student") gets
    # exactly no gradient through the loss. adpa reads a third participant, its teacher's reference.
    method = build(name, student="peer", teacher="student")
    assert method.needs.trained == ("peer",)  # "student" is always there, so the record does not list it
    names = ("student", "peer", "reference") if name == "adpa" else ("student", "peer")
    state = make_state(method, "tokens", names=names, model_of={"reference": "teacher"})
    grads = loss_grads(state, setup("tokens").batch)
    assert_zero(grads["student"], f"{name}: the target")
    assert_nonzero(grads["peer"], f"{name}: the learner")
    if name == "adpa":
        assert_zero(grads["reference"], "adpa: the reference")
