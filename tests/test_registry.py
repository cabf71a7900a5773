"""Every method in the registry is selectable by name, builds a train state and trains in the jitted step;
the README's method table is the registry's."""

import pathlib

import jax
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods, models
from jaxkd.models.cifar_resnet import CifarResNet
from tests.helpers import NUM_CLASSES, teacher_variables, tiny_batch, tiny_image_batch, tiny_models

MLP_TEACHER, MLP_STUDENT = tiny_models()
MLP_BATCH = tiny_batch()
# What each method needs is declared where it registers (`inputs`, `example`, `same_width`): methods that read
# feature maps (RepDistiller's stage taps) run on two tiny CIFAR ResNets (one block per stage, 8x8 images:
# maps 8x8, 4x4, 2x2), classifier methods on the MLPs (logits, hidden layers, `pooled`).
CONV_METHODS = {n for n, r in methods.REGISTRY.items() if r.inputs == "feature_maps"}
CONV_TEACHER = models.from_linen(CifarResNet(depth=8, num_filters=(8, 8, 16, 16), num_classes=NUM_CLASSES), name="t")
CONV_STUDENT = models.from_linen(CifarResNet(depth=8, num_filters=(4, 4, 8, 8), num_classes=NUM_CLASSES), name="s")
CONV_BATCH = tiny_image_batch(batch_size=8)


def lelp_projections_file(tmp_path, teacher, teacher_vars, batch) -> str:
    """LELP's projections (computed once from the teacher's embeddings) as the .npy a spec names."""
    out = teacher.apply(teacher_vars, batch["image"], train=False)
    projections = methods.lelp_projections(np.asarray(out.features["pooled"]), batch["label"], num_classes=NUM_CLASSES,
                                          subclasses=2)
    path = tmp_path / "lelp.npy"
    np.save(path, projections)
    return f"projections={str(path)!r}"


# Language-model methods run on two tiny LMs over byte-sized vocabularies and a token batch.
LM_METHODS = {n for n, r in methods.REGISTRY.items() if r.inputs in ("tokens", "two_tokenizations")}
# The feature-map methods' own test files each train them in the jitted step (on the same tiny ResNets), and
# so do these LM methods' (tests/test_lm_train.py, tests/test_lm_methods.py, tests/test_cross_tokenizer.py,
# tests/test_uld.py, tests/test_gkd_seq.py);
# here they are the slow cases (`pytest -m slow`), so the suite stays under 10 minutes.
# (preference_kd trains in llava_mod's second step; adpa, dac_kl and distillm — both branches — are checked
# against closed forms through their jitted losses in tests/test_lm_methods.py.)
TRAINED_ELSEWHERE = CONV_METHODS | {"adpa", "alm", "dac_kl", "distillm", "gkd", "llava_mod", "lm_ce", "minillm",
                                    "preference_kd", "sparse_token_kd", "token_kd"}
# Methods whose student is a merged model (its only parameters are merge coefficients, jaxkd.merging), not the
# plain MLP here: tests/test_merging_expert_merging.py trains expert_merging in the jitted step.
MERGED_STUDENT = {"expert_merging"}
# Methods that read two tokenizations of one text train in tests/test_cross_tokenizer.py (parallel rows).
TWO_TOKENIZATIONS = {n for n, r in methods.REGISTRY.items() if r.inputs == "two_tokenizations"}
# Batch transforms alone (mixup, cutmix, inception_crop) have no loss of their own: tests/test_batch_transforms.py
# trains them in chains (function_matching, a transform chain with its loss, trains here).
TRANSFORMS_ONLY = {"mixup", "cutmix", "inception_crop"}
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in TRAINED_ELSEWHERE else n
         for n in sorted(set(methods.REGISTRY) - TWO_TOKENIZATIONS - TRANSFORMS_ONLY - MERGED_STUDENT)]


def lm_fixtures(method):
    """Student, participants and batch for an LM method: every participant it reads is a frozen tiny LM."""
    from jaxkd.batch import TOKEN_NORMALIZER as TOKEN_NORMALIZER_KEY, token_normalizer
    from jaxkd.models import lm as lm_models

    cfg = lm_models.LMConfig(vocab_size=128, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
    model = lm_models.lm(cfg)
    rng = np.random.default_rng(0)
    mask = np.arange(8)[None] < np.array([[8], [6], [7], [5]])
    batch = {"tokens": rng.integers(32, 128, size=(4, 8)).astype(np.int32), "mask": mask,
             TOKEN_NORMALIZER_KEY: token_normalizer(mask[:, 1:] & mask[:, :-1])}
    init = lambda seed: jaxkd.sharding.unbox(model.init(jax.random.PRNGKey(seed), {"tokens": batch["tokens"]}))
    participants = {name: jaxkd.Participant(model, init(i + 1), trains=False, input=("tokens", "mask"))
                    for i, name in enumerate(method.needs.participants)}
    return jaxkd.participants.student(model, input=("tokens", "mask")), participants, batch


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_method_parses_builds_a_state_and_trains_one_jitted_step(name, tmp_path):
    if name in LM_METHODS:
        method = methods.parse(f"{name}({methods.REGISTRY[name].example})")
        student, participants, batch = lm_fixtures(method)
        state = jaxkd.create(participants={"student": student, **participants}, method=method, tx=optax.sgd(0.05),
                             sample_batch=batch, rng=jax.random.PRNGKey(0))
        state, metrics = jaxkd.make_train_step()(state, batch)
        assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
        return
    conv = name in CONV_METHODS
    TEACHER, STUDENT, BATCH = (CONV_TEACHER, CONV_STUDENT, CONV_BATCH) if conv else (MLP_TEACHER, MLP_STUDENT, MLP_BATCH)
    if methods.REGISTRY[name].same_width:  # maps compared channel by channel: a student as wide as the teacher
        STUDENT = CONV_TEACHER
    TEACHER_VARS = teacher_variables(TEACHER, BATCH)
    args = methods.REGISTRY[name].example
    if name == "lelp":
        args = lelp_projections_file(tmp_path, TEACHER, TEACHER_VARS, BATCH)
    method = methods.parse(f"{name}({args})")
    needs = method.needs
    batch = dict(BATCH)
    if "index" in needs.batch_keys:
        batch["index"] = np.arange(len(batch["label"]), dtype=np.int32)
    if needs.meta_prefix is not None:
        batch.update({needs.meta_prefix + k: v for k, v in tiny_batch(seed=1).items()})
    # Every participant the method reads: trained ones fresh (peers, online teachers), others frozen.
    participants = {
        name: jaxkd.Participant(TEACHER, None if name in needs.trained else TEACHER_VARS, trains=name in needs.trained)
        for name in needs.participants
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
        # A factory's arguments without a default are in its registered example (the spec builds).
        import inspect

        required = [p.name for p in inspect.signature(entry.factory).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert all(f"{arg}=" in entry.example for arg in required), (name, required, entry.example)


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


def test_names_that_moved_out_of_losses_still_resolve_with_a_warning():
    # Method state and host precomputes moved next to their method; the old address warns and still works.
    with pytest.warns(FutureWarning, match=r"jaxkd.losses.taid_update moved: use jaxkd.methods.taid_update"):
        assert jaxkd.losses.taid_update is methods.taid_update
    with pytest.warns(FutureWarning, match="jaxkd.checks.check_teacher_weights"):
        assert jaxkd.losses.check_teacher_weights is jaxkd.checks.check_teacher_weights
    assert "taid_update" not in jaxkd.losses.__all__ and "taid_update" in methods.__all__
    with pytest.raises(AttributeError, match="no attribute 'taid_updat'"):
        jaxkd.losses.taid_updat


def test_one_method_per_file_named_after_it():
    # The folder tree is the method table: jaxkd/methods/<family>/<name>.py registers the method <name>, or is
    # a helper module its family shares (connectors, the LM rollout, token targets) and registers none.
    import collections

    from jaxkd.methods.registry import folder_of

    by_module = collections.defaultdict(list)
    for name, entry in methods.REGISTRY.items():
        if entry.paper:  # built-in
            by_module[entry.factory.__module__].append(name)
            assert folder_of(entry) in jaxkd.methods.FAMILIES, name
    for module, names in by_module.items():
        assert names == [module.rsplit(".", 1)[1]], (module, names)
    families = pathlib.Path(jaxkd.methods.__file__).parent
    files = {f"jaxkd.methods.{p.parent.name}.{p.stem}" for f in jaxkd.methods.FAMILIES
             for p in (families / f).glob("*.py") if p.stem != "__init__"}
    helpers = files - set(by_module)
    assert helpers == {"jaxkd.methods.feature.connectors", "jaxkd.methods.lm.rollout", "jaxkd.methods.lm.tokens",
                       "jaxkd.methods.logit.ranking"}, helpers
