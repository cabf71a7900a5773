"""What a method needs (``Method.needs``, a :class:`jaxkd.methods.Needs`): the record, how chains merge it,
how ``jaxkd.create`` checks it, the former flags, and ``create`` as its named steps."""

import warnings

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, train_state
from jaxkd.methods import Method, Needs
from jaxkd.methods.base import LossAux, stateless_method

from tests.helpers import teacher_variables, tiny_batch, tiny_models

TEACHER, STUDENT = tiny_models()
BATCH = tiny_batch()
TEACHER_VARS = teacher_variables(TEACHER, BATCH)


def _zero_loss(vars, inputs, rng):
    return jax.numpy.zeros(()), LossAux({}, vars.state)


# ----- the record -----

def test_the_record_lists_trained_participants_among_the_read_ones_and_never_the_student():
    needs = Needs(participants=("student", "teacher", "teacher"), trained=("peer", "student"), batch_keys=("a", "a"))
    assert needs.participants == ("teacher", "peer")
    assert needs.trained == ("peer",)
    assert needs.batch_keys == ("a",)
    assert needs.teacher and needs.learned_from == ("teacher",)
    assert Needs() == Needs(participants=(), trained=(), labels=False, batch_keys=(), meta_prefix=None,
                            cross_vocabulary=False)
    assert not Needs().teacher and Needs(participants=["wrn"]).participants == ("wrn",)


@pytest.mark.parametrize("bad", [{"participants": "teacher"}, {"trained": "peer"}, {"batch_keys": "index"},
                                 {"participants": ("teacher", 3)}, {"meta_prefix": 1}])
def test_the_record_refuses_what_is_not_a_tuple_of_names(bad):
    with pytest.raises(TypeError, match="Needs"):
        Needs(**bad)


def test_an_empty_meta_prefix_is_refused():
    with pytest.raises(ValueError, match="meta_prefix must not be empty"):
        Needs(meta_prefix="")


def test_merging_unites_every_entry_in_order():
    a = Needs(participants=("teacher",), batch_keys=("index",))
    b = Needs(participants=("wrn", "teacher"), trained=("peer",), labels=True, batch_keys=("tokens", "index"),
              meta_prefix="meta_", cross_vocabulary=True)
    merged = a | b
    assert merged == a.merge(b)
    assert merged.participants == ("teacher", "wrn", "peer")
    assert merged.trained == ("peer",)
    assert merged.labels and merged.cross_vocabulary and merged.meta_prefix == "meta_"
    assert merged.batch_keys == ("index", "tokens")
    assert (Needs(meta_prefix="meta_") | Needs(meta_prefix="meta_")).meta_prefix == "meta_"
    assert Needs().merge() == Needs()


def test_a_chain_needs_what_its_members_need_together():
    chained = methods.ce() + methods.dml(peers=("peer",)) + methods.crd(num_examples=16, nce_k=4)
    assert chained.needs == methods.ce().needs | methods.dml(peers=("peer",)).needs | methods.crd(
        num_examples=16, nce_k=4).needs
    assert chained.needs.participants == ("peer", "teacher")
    assert chained.needs.trained == ("peer",) and chained.needs.labels
    assert chained.needs.batch_keys == ("index",)
    # Nested chains and weights keep it.
    assert (0.5 * chained + methods.kd()).needs == chained.needs
    assert methods.kd().named("kd2").needs == methods.kd().needs


def test_members_with_different_meta_batches_are_refused():
    a = methods.tgeo_kd()
    b = methods.tgeo_kd(meta_prefix="held_", name="tgeo_kd2")
    with pytest.raises(ValueError, match=r"share one meta batch, got meta prefixes \['held_', 'meta_'\]"):
        methods.chain(a, b)
    with pytest.raises(ValueError, match="share one meta batch"):
        a.needs | b.needs
    assert (a + methods.tgeo_kd(name="tgeo_kd2")).needs.meta_prefix == "meta_"


def test_built_in_methods_state_what_they_read():
    assert methods.kd().needs == Needs(participants=("teacher",))
    assert methods.ce().needs == Needs(labels=True)
    assert methods.kd(student="peer", teacher="student").needs == Needs(participants=("peer",), trained=("peer",))
    assert methods.rkd().needs.participants == ("teacher",)  # it relied on stateless_method's former default
    assert methods.alm().needs.cross_vocabulary and not methods.kd().needs.cross_vocabulary
    assert methods.tgeo_kd().needs == Needs(participants=("teacher",), labels=True, meta_prefix="meta_")


def test_stateless_method_assumes_no_teacher():
    own = stateless_method("zero", lambda inputs, rng: 0.0 * inputs.output("student").logits.sum())
    assert own.needs == Needs()
    state = jaxkd.create(student=STUDENT, method=methods.ce() + own, tx=optax.sgd(0.1), sample_batch=BATCH,
                         rng=jax.random.PRNGKey(0))  # no teacher asked for, none needed
    assert [n for n, _ in state.participants] == ["student"]
    keywords = stateless_method("kw", lambda inputs, rng: 0.0, participants=("teacher",), needs_labels=True,
                                batch_keys=("index",), needs=Needs(cross_vocabulary=True))
    assert keywords.needs == Needs(participants=("teacher",), labels=True, batch_keys=("index",), cross_vocabulary=True)


# ----- checked when the train state is created -----

def test_a_role_the_state_lacks_lists_the_participants():
    with pytest.raises(ValueError, match=r"reads participant 'wrn', but the train state has participants "
                                         r"\['student', 'teacher'\]"):
        jaxkd.create(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS,
                     method=methods.ce() + methods.kd(teacher="wrn"), tx=optax.sgd(0.1), sample_batch=BATCH,
                     rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"reads participant 'peer', but the train state has participants \['student'\]"):
        jaxkd.create(student=STUDENT, method=methods.kd(student="peer", teacher="student"), tx=optax.sgd(0.1),
                     sample_batch=BATCH, rng=jax.random.PRNGKey(0))


def test_check_needs_names_what_is_missing():
    parts = {"student": jaxkd.Participant(STUDENT), "peer": jaxkd.Participant(TEACHER, TEACHER_VARS, trains=False)}
    check = lambda needs, batch=BATCH: train_state.check_needs(needs, parts, batch)  # noqa: E731
    check(Needs(participants=("peer",), labels=True))
    with pytest.raises(ValueError, match=r"needs batch keys \['label', 'index'\], the batch has \['image'\]"):
        check(Needs(labels=True, batch_keys=("index",)), {"image": BATCH["image"]})
    with pytest.raises(ValueError, match="needs a teacher .* the participants are \\['peer', 'student'\\]"):
        check(Needs(participants=("teacher",)))
    with pytest.raises(ValueError, match="trains participant 'peer'.*frozen: give it trains=True"):
        check(Needs(trained=("peer",)))


# ----- the former flags -----

def test_former_method_keywords_build_the_record_with_a_warning():
    with pytest.warns(FutureWarning, match=r"Method\(needs_teacher=, needs_labels=\) is deprecated"):
        method = Method(name="old", loss=_zero_loss, needs_teacher=True, needs_labels=True)
    assert method.needs == Needs(participants=("teacher",), labels=True)
    with pytest.warns(FutureWarning):
        both = Method(name="both", loss=_zero_loss, needs=Needs(batch_keys=("index",)), meta_prefix="meta_",
                      participants=("peer",), trained=("peer",), cross_vocabulary=True)
    assert both.needs == Needs(participants=("peer",), trained=("peer",), batch_keys=("index",),
                               meta_prefix="meta_", cross_vocabulary=True)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['needz'\\]"):
        Method(name="typo", loss=_zero_loss, needz=Needs())
    with pytest.raises(TypeError, match="takes a jaxkd.methods.Needs record"):
        Method(name="dict", loss=_zero_loss, needs={"labels": True})
    with pytest.warns(FutureWarning, match="stateless_method\\(needs_teacher=...\\) is deprecated"):
        assert stateless_method("old", lambda inputs, rng: 0.0, needs_teacher=True).needs.participants == ("teacher",)


@pytest.mark.parametrize("attribute, entry", [
    ("needs_teacher", "teacher"), ("needs_labels", "labels"), ("batch_keys", "batch_keys"),
    ("meta_prefix", "meta_prefix"), ("participants", "participants"), ("trained", "trained"),
    ("cross_vocabulary", "cross_vocabulary"),
])
def test_former_attributes_read_the_record_with_a_warning(attribute, entry):
    method = methods.chain(methods.tgeo_kd(), methods.crd(num_examples=16, nce_k=4), methods.dml())
    with pytest.warns(FutureWarning, match=f"Method.{attribute} is deprecated: read Method.needs.{entry}"):
        value = getattr(method, attribute)
    assert value == getattr(method.needs, entry)
    with pytest.raises(AttributeError):
        setattr(method, attribute, value)


def test_the_new_spelling_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = methods.parse("ce + kd + crd(num_examples=16, nce_k=4) + dml")
        assert method.needs.teacher and method.needs.batch_keys == ("index",)


# ----- create, step by step -----

def test_create_is_its_named_steps():
    method = methods.ce() + methods.kd()
    kwargs = dict(student=STUDENT, teacher=TEACHER, teacher_variables=TEACHER_VARS, participants=None,
                  student_variables=None, input_key="image")
    parts = train_state.gather_participants(**kwargs)
    tx = optax.sgd(0.1)
    planned = train_state.plan(method, parts, BATCH, tx=tx, rng=jax.random.PRNGKey(0))
    assert planned.num_classes == 5 and planned.trained_names == ["student"] and planned.frozen_names == ["teacher"]
    assert planned.outputs["teacher"].logits.shape == (16, 5)  # abstract: shapes only
    assert isinstance(planned.outputs["teacher"].logits, jax.ShapeDtypeStruct)
    assert planned.method.terms and planned.method.needs == method.needs
    shardings = train_state.variable_shardings(planned, None)
    assert shardings == {"student": None, "teacher": None}
    trained, method_vars, opt_state, frozen = train_state.init(planned, shardings, None)
    train_state.check_loss(planned, trained, method_vars, frozen)
    stepwise = train_state.place(planned, trained, method_vars, opt_state, frozen, None)
    direct = jaxkd.create(method=method, tx=tx, sample_batch=BATCH, rng=jax.random.PRNGKey(0), **kwargs)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        jax.device_get(stepwise), jax.device_get(direct))
    assert all(jax.tree.leaves(same))
    assert stepwise.participants == direct.participants and stepwise.batch_spec == direct.batch_spec
    assert stepwise.num_classes == direct.num_classes and stepwise.label_key == direct.label_key
