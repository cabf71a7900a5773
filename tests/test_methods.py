"""The method protocol: chains, weights, schedules, names, state and trainable method parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import losses, methods
from jaxkd.methods import LossAux, LossInputs, Method, MethodVars, Needs
from jaxkd.models import Outputs

from tests.helpers import teacher_variables, tiny_batch, tiny_models


def fake_inputs(seed=0, step=0):
    rng = np.random.default_rng(seed)
    zs, zt = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    batch = {"label": np.array([0, 1, 2, 3, 0, 1], np.int32)}
    return LossInputs.of(
        student=Outputs(jnp.asarray(zs), {}, {}),
        teacher=Outputs(jnp.asarray(zt), {}, {}),
        batch=batch,
        step=jnp.asarray(step, jnp.int32),
    )


def run(method, inputs):
    """The method's (loss, aux) on ``inputs``, initialized from a fixed key."""
    vars = method.init(jax.random.PRNGKey(0), inputs)
    return method.loss(vars, inputs, jax.random.PRNGKey(1))


def test_chain_is_weighted_sum_and_reports_every_term():
    inputs = fake_inputs()
    total, aux = run(methods.ce() + 0.5 * methods.kd(temperature=2.0), inputs)
    ce = losses.cross_entropy(inputs.outputs["student"].logits, inputs.batch["label"])
    kd = losses.kd(inputs.outputs["student"].logits, inputs.outputs["teacher"].logits, temperature=2.0)
    np.testing.assert_allclose(aux.metrics["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(aux.metrics["kd"], kd, rtol=1e-6)
    np.testing.assert_allclose(total, ce + 0.5 * kd, rtol=1e-6)
    np.testing.assert_allclose(aux.metrics["loss"], total)


def test_weight_schedule_follows_step():
    warmup = lambda step: jnp.minimum(step / 10.0, 1.0)
    method = methods.chain(methods.kd(temperature=1.0, weight=warmup))
    for step, w in [(0, 0.0), (5, 0.5), (20, 1.0)]:
        total, aux = run(method, fake_inputs(step=step))
        np.testing.assert_allclose(aux.metrics["kd/weight"], w)
        np.testing.assert_allclose(total, w * aux.metrics["kd"], rtol=1e-6)


def test_weight_on_a_chain_scales_its_total():
    """Bug: ``0.5 * (ce + kd)`` built a chain whose weight was never applied."""
    inputs = fake_inputs()
    unweighted, _ = run(methods.ce() + methods.kd(temperature=2.0), inputs)
    weighted, aux = run(0.5 * (methods.ce() + methods.kd(temperature=2.0)), inputs)
    np.testing.assert_allclose(weighted, 0.5 * unweighted, rtol=1e-6)
    nested, _ = run(methods.chain(2.0 * (0.5 * (methods.ce() + methods.kd(temperature=2.0)))), inputs)
    np.testing.assert_allclose(nested, unweighted, rtol=1e-6)


def test_weight_multiplies_a_methods_own_schedule():
    """Bug: ``schedule * dkd(warmup_steps=10)`` replaced the warm-up instead of multiplying it."""
    schedule = lambda step: 2.0 + 0.0 * step
    method = methods.chain(schedule * methods.dkd(warmup_steps=10))
    for step, expected in [(0, 2.0 * 1 / 10), (4, 2.0 * 5 / 10), (50, 2.0)]:
        _, aux = run(method, fake_inputs(step=step))
        np.testing.assert_allclose(aux.metrics["dkd/weight"], expected, rtol=1e-6)
    constant = methods.chain(3.0 * methods.dkd(warmup_steps=4))
    _, aux = run(constant, fake_inputs(step=1))
    np.testing.assert_allclose(aux.metrics["dkd/weight"], 3.0 * 2 / 4, rtol=1e-6)
    assert (2.0 * (0.5 * methods.kd())).weight == 1.0


@pytest.mark.parametrize("name", ["loss", "grad_norm", "accuracy", "skipped", "a/b", ""])
def test_method_names_that_would_overwrite_metrics_are_refused(name):
    with pytest.raises(ValueError, match="name"):
        methods.kd(name=name)


def test_chain_flattens_and_requires_unique_names():
    c = methods.chain(methods.ce() + methods.kd(), methods.kd(temperature=8.0).named("kd_t8"))
    assert [m.name for m in c.terms] == ["ce", "kd", "kd_t8"]
    with pytest.raises(ValueError, match="unique"):
        methods.ce() + methods.ce()
    with pytest.raises(ValueError, match="temperature"):
        methods.kd(temperature=0.0)


def projection_method(feature="pooled", width=32):
    """A user-written FitNets-style method: a trainable linear connector plus a step counter in state."""

    def init(rng, inputs):
        d_in = jaxkd.models.get_feature(inputs.output("student"), feature, who="student").shape[-1]
        kernel = jax.random.normal(rng, (d_in, width)) * 0.1
        return MethodVars(params={"kernel": kernel}, state={"calls": jnp.zeros((), jnp.int32)})

    def loss(vars, inputs, rng):
        s = jaxkd.models.get_feature(inputs.output("student"), feature, who="student") @ vars.params["kernel"]
        t = jaxkd.models.get_feature(inputs.target("teacher"), feature, who="teacher")
        value = jnp.mean((s - t) ** 2)
        return value, LossAux({"calls": vars.state["calls"]}, {"calls": vars.state["calls"] + 1})

    return Method(name="hint", init=init, loss=loss, needs=Needs(participants=("teacher",)))


def test_user_method_params_are_trained_and_state_is_carried():
    teacher, student = tiny_models()
    batch = tiny_batch()
    state = jaxkd.create(
        student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
        method=methods.ce() + projection_method(), tx=optax.sgd(0.1), sample_batch=batch,
        rng=jax.random.PRNGKey(0),
    )
    kernel0 = np.asarray(state.method_vars.params["hint"]["kernel"])
    step = jaxkd.make_train_step()
    first = None
    for _ in range(20):
        state, metrics = step(state, batch)
        first = float(metrics["hint"]) if first is None else first
    assert int(state.method_vars.state["hint"]["calls"]) == 20
    assert not np.allclose(kernel0, state.method_vars.params["hint"]["kernel"])
    assert float(metrics["hint"]) < first


def test_missing_feature_error_lists_what_the_model_sows():
    teacher, student = tiny_models()
    batch = tiny_batch()
    with pytest.raises(ValueError, match=r"does not sow a feature named 'stage9'.*pooled"):
        jaxkd.create(
            student=student, teacher=teacher, teacher_variables=teacher_variables(teacher, batch),
            method=projection_method(feature="stage9"), tx=optax.sgd(0.1), sample_batch=batch,
            rng=jax.random.PRNGKey(0),
        )


def test_parse_builds_the_same_chain_as_code():
    inputs = fake_inputs()
    parsed = methods.parse("ce(label_smoothing=0.1) + 0.5 * kd(temperature=2.0)")
    coded = methods.ce(label_smoothing=0.1) + 0.5 * methods.kd(temperature=2.0)
    assert [(m.name, m.weight) for m in parsed.terms] == [("ce", 1.0), ("kd", 0.5)]
    np.testing.assert_allclose(run(parsed, inputs)[0], run(coded, inputs)[0], rtol=1e-6)


def test_parse_reads_named_constants():
    method = methods.parse("ce + taid(total_steps=steps)", {"steps": 123})
    assert [m.name for m in method.terms] == ["ce", "taid"]
    with pytest.raises(ValueError, match="unknown name 'steps'"):
        methods.parse("taid(total_steps=steps)")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ce + nope", "unknown method 'nope'"),
        ("kd(4)", "keywords"),
        ("kd(temperature=__import__('os'))", "literals"),
        ("kd(temperature=-1)", "temperature"),
        ("ce +", "cannot parse"),
        ("kd(temperature=4, temperature=5)", "keyword 'temperature' is given twice"),
        ("kd(temperature='4')", "temperature must be a number"),
        ("kd(temprature=4)", "unexpected keyword"),
        ("1e400 * kd", "weight must be a finite number"),
        ("-1 * kd", r"weight must lie in \[0, inf\]"),
        ("kd * ce", "two methods cannot be multiplied"),
        ("kd(temperature=1e30)", r"temperature must lie in \[0.01, 100\]"),
        ("kd(temperature=steps)", "unknown name 'steps'"),
    ],
)
def test_parse_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        methods.parse(spec)


def test_parse_refuses_non_strings_and_survives_very_long_specs():
    with pytest.raises(ValueError, match="must be a string"):
        methods.parse(None)
    # 1,200 terms used to overflow the recursion; now it is read and refused for its repeated names.
    with pytest.raises(ValueError, match="unique"):
        methods.parse(" + ".join(["kd"] * 1200))
    with pytest.raises(ValueError, match="too deeply nested"):
        methods.parse(" + ".join(["kd"] * 100_000))


def test_parse_refuses_huge_integer_powers_promptly():
    # In a subprocess with a timeout: Python's big-integer power does not check for signals, so a parser
    # that computes 9**(9**9) hangs where no alarm can interrupt it.
    import subprocess
    import sys
    code = (
        "from jaxkd import methods\n"
        "for spec in ['kd(temperature=9**9**9)', '10**10**8 * kd', 'kd(temperature=(10**300)**(10**300))']:\n"
        "    try:\n"
        "        methods.parse(spec)\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing a spec with a huge integer power did not finish in 60 s")
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("too large" in line for line in lines), out.stdout + out.stderr
    assert "at '9**9**9'" in lines[0]
    # Ordinary powers still compute; 2**1000 is within the bound (and beyond the temperature range).
    assert [t.name for t in methods.parse("2**-1 * kd(temperature=2**2)").terms] == ["kd"]
    with pytest.raises(ValueError, match="temperature"):
        methods.parse("kd(temperature=2**1000)")


def test_parse_reads_arithmetic_over_named_constants():
    method = methods.parse("ce + dkd(warmup_steps=steps * 20 // 240) + 0.0008 * batch_size * sinkd",
                           {"steps": 400, "batch_size": 64})
    dkd, sinkd = method.terms[1], method.terms[2]
    np.testing.assert_allclose(dkd.weight(jnp.asarray(0)), 1 / 33, rtol=1e-6)  # warmup_steps = 33
    np.testing.assert_allclose(sinkd.weight, 0.0512)
    with pytest.raises(ValueError, match="names of registered methods"):
        methods.parse("kd", {"kd": 3})


def test_stage_weights_switch_methods_at_a_step():
    """``until(n)`` / ``after(n)`` weights (a two-stage recipe in one run), also times a number."""
    chain = methods.parse("until(3) * kd + after(3) * ce + 2 * after(2) * dist")
    weights = {t.name: [float(t.weight(jnp.asarray(s, jnp.int32))) for s in range(5)] for t in chain.terms}
    assert weights == {"kd": [1, 1, 1, 0, 0], "ce": [0, 0, 0, 1, 1], "dist": [0, 0, 2, 2, 2]}
    assert [float(methods.until(0)(jnp.int32(0))), float(methods.after(0)(jnp.int32(0)))] == [0.0, 1.0]
    # A weight times a parenthesized sum weights every member (Python's `after(2) * (ce() + kd())` too).
    staged = methods.parse("until(2) * dist + 0.5 * after(2) * (ce + kd(temperature=4))")
    weights = {t.name: [float(t.weight(jnp.asarray(s, jnp.int32))) for s in range(4)] for t in staged.terms}
    assert weights == {"dist": [1, 1, 0, 0], "ce": [0, 0, 0.5, 0.5], "kd": [0, 0, 0.5, 0.5]}
    python = methods.until(2) * methods.dist() + 0.5 * (methods.after(2) * (methods.ce() + methods.kd(temperature=4)))
    assert {t.name: [float(t.weight(jnp.asarray(s, jnp.int32))) for s in range(4)] for t in python.terms} == weights
    for bad, message in [("until(-1) * kd", "whole number"), ("until(1, 2) * kd", "one argument"),
                         ("until(1.5) * kd", "whole number")]:
        with pytest.raises(ValueError, match=message):
            methods.parse(bad)


def test_former_method_names_still_work_with_one_deprecation_line():
    """A spec using an old name parses to the renamed method, with one FutureWarning naming the new name; the
    old Python names resolve too; a misspelled name suggests the closest."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method = methods.parse("ce + fkl(temperature=2) + 0.5 * ab(alpha=0.5, beta=0.5)")
    assert [m.name for m in method.terms] == ["ce", "forward_kl", "alpha_beta_divergence"]
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert messages == ["method name 'fkl' is deprecated: use 'forward_kl' (a method's name is its loss function's)",
                        "method name 'ab' is deprecated: use 'alpha_beta_divergence' (a method's name is its loss "
                        "function's)"]
    with pytest.warns(FutureWarning, match="jaxkd.methods.factor_transfer"):
        assert methods.ft is methods.factor_transfer
    with pytest.warns(FutureWarning, match="jaxkd.losses.nd"):
        assert jaxkd.losses.nd_loss is jaxkd.losses.nd
    for old, new in methods.registry.ALIASES.items():
        assert new in methods.REGISTRY and old not in methods.REGISTRY
    with pytest.raises(ValueError, match="unknown method 'forward_k' \\(did you mean 'forward_kl'\\?\\)"):
        methods.parse("ce + forward_k")
