"""Expert Merging (jaxkd.merging.expert_merging + the ``expert_merging`` method) against references computed
another way: on a linear model the loss is quadratic in the coefficients, so the optimum is the solution of
NumPy's normal equations, and the train step must reach it; the loss value against NumPy, the gradient against
float64 central differences, the merged parameters against ``θ₀ + Σ λ τ`` by NumPy, the chunk plan by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxkd
from jaxkd import methods, models, sharding
from jaxkd.merging import (chunk_plan, coefficients, expert_merging_model, expert_merging_participants,
                           expert_merging_variables, layer_importance, merged_params)
from jaxkd.methods import LossInputs
from jaxkd.models.base import Model, Outputs
from jaxkd.train_state import ModelVariables

D, C, N = 4, 3, 6  # inputs, outputs, calibration examples per expert
ENTRIES = ("calib_0", "calib_1")
NAMES = ("expert_0", "expert_1")


def linear_model() -> Model:
    """logits = x A + x B, with the hidden state h = x A: both linear in the merge coefficients."""
    def init(rng, x):
        ka, kb = jax.random.split(rng)
        return {"params": {"a": {"kernel": jax.random.normal(ka, (D, C))},
                           "b": {"kernel": jax.random.normal(kb, (D, C))}}}

    def apply(variables, x, *, train=False, rngs=None):
        p = variables["params"]
        h = x @ p["a"]["kernel"]
        return Outputs(logits=h + x @ p["b"]["kernel"], features={"h": h},
                       model_state={k: v for k, v in variables.items() if k != "params"})

    return Model(init=init, apply=apply, name="linear")


def linear_problem(dtype=np.float32):
    rng = np.random.default_rng(0)
    tree = lambda: {"a": {"kernel": rng.normal(size=(D, C)).astype(dtype)},
                    "b": {"kernel": rng.normal(size=(D, C)).astype(dtype)}}
    base, experts = tree(), [tree(), tree()]
    batch = {k: rng.normal(size=(N, D)).astype(dtype) for k in ENTRIES}
    return base, experts, batch


# The configuration every linear check uses: MSE on logits and the hidden state, L2 regularizer, task weights.
SETTINGS = dict(features=("h",), task_weights=(1.0, 2.0), logit_loss="mse", hidden_weight=0.5, reg_weight=0.1,
                regularizer="l2")
CHUNKS = {"b": 2}  # group "b" gets two coefficients per expert: the 12 values of b's kernel in two halves
INIT = 0.3


def directions(base, experts):
    """NumPy: one (Δa, Δb) pair per coefficient, in the order [a: e0, e1] then [b: e0k0, e0k1, e1k0, e1k1]."""
    out = []
    for e in experts:
        out.append((e["a"]["kernel"] - base["a"]["kernel"], np.zeros((D, C))))
    for e in experts:
        tb = (e["b"]["kernel"] - base["b"]["kernel"]).reshape(-1)
        for k in range(2):
            part = np.zeros(D * C)
            part[k * 6:(k + 1) * 6] = tb[k * 6:(k + 1) * 6]
            out.append((np.zeros((D, C)), part.reshape(D, C)))
    return [(np.float64(a), np.float64(b)) for a, b in out]


def as_vector(lam):
    """The coefficient tree {a: [2, 1], b: [2, 2]} in the order of :func:`directions`."""
    return np.concatenate([np.asarray(lam["a"], np.float64)[:, 0], np.asarray(lam["b"], np.float64).reshape(-1)])


def as_tree(vector):
    return {"a": np.asarray(vector[:2], np.float32)[:, None], "b": np.asarray(vector[2:], np.float32).reshape(2, 2)}


def numpy_quadratic(base, experts, batch):
    """The loss's quadratic form: L(λ) = Σ_j w_j ‖M_j λ − r_j‖² + ρ ‖λ − λ₀‖²."""
    dirs = directions(base, experts)
    alphas, terms = SETTINGS["task_weights"], []
    for i, (entry, expert) in enumerate(zip(ENTRIES, experts)):
        x = np.float64(batch[entry])
        a0, b0 = np.float64(base["a"]["kernel"]), np.float64(base["b"]["kernel"])
        ea, eb = np.float64(expert["a"]["kernel"]), np.float64(expert["b"]["kernel"])
        logits_m = np.stack([(x @ (da + db)).reshape(-1) for da, db in dirs], axis=1)
        logits_r = (x @ (ea + eb) - x @ (a0 + b0)).reshape(-1)
        hidden_m = np.stack([(x @ da).reshape(-1) for da, _ in dirs], axis=1)
        hidden_r = (x @ ea - x @ a0).reshape(-1)
        # (1/E) α_i [mean over N·C logit values + 0.5 · mean over N·C hidden values]
        terms.append((alphas[i] / 2 / (N * C), logits_m, logits_r))
        terms.append((alphas[i] / 2 * SETTINGS["hidden_weight"] / (N * C), hidden_m, hidden_r))
    rho = SETTINGS["reg_weight"] / 3  # Σ (λ − λ₀)² divided by the coefficients per expert (1 + 2)
    return terms, rho


def numpy_loss(terms, rho, lam):
    return sum(w * np.sum((m @ lam - r) ** 2) for w, m, r in terms) + rho * np.sum((lam - INIT) ** 2)


def numpy_optimum(terms, rho):
    hessian = sum(w * m.T @ m for w, m, _ in terms) + rho * np.eye(6)
    rhs = sum(w * m.T @ r for w, m, r in terms) + rho * INIT
    return np.linalg.solve(hessian, rhs), 2 * hessian


def linear_state(tx, parametrization="linear"):
    base, experts, batch = linear_problem()
    parts = expert_merging_participants(linear_model(), base, experts, entries=ENTRIES, names=NAMES, init=INIT,
                                        chunks=CHUNKS, parametrization=parametrization)
    method = methods.expert_merging(experts=NAMES, entries=ENTRIES, **SETTINGS)
    state = jaxkd.create(participants=parts, method=method, tx=tx, sample_batch=batch, rng=jax.random.PRNGKey(0))
    return state, (base, experts, batch)


def test_train_step_reaches_the_normal_equations_optimum_and_the_loss_matches_numpy():
    base, experts, batch = linear_problem()
    terms, rho = numpy_quadratic(base, experts, batch)
    optimum, hessian = numpy_optimum(terms, rho)
    eig = np.linalg.eigvalsh(hessian)
    lr = 1.0 / eig[-1]
    steps = int(np.ceil(np.log(1e-7) / np.log(1 - eig[0] / eig[-1])))  # gradient descent's contraction
    assert steps < 3000, steps  # the problem is well enough conditioned for a quick test

    state, _ = linear_state(optax.sgd(lr))
    step = jaxkd.make_train_step()
    # The loss at a fixed λ (the step reports the loss before its update) against NumPy's.
    fixed = np.array([0.7, -0.2, 0.4, 1.1, -0.5, 0.25])
    params = {"coefficients": {k: jnp.asarray(v) for k, v in as_tree(fixed).items()}}
    probe = jax.tree.map(jnp.copy, state)  # the step donates its state: the probe owns its buffers
    probe = probe.replace(trained={"student": ModelVariables(params, probe.student.model_state)})
    _, metrics = step(probe, batch)
    np.testing.assert_allclose(float(metrics["loss"]), numpy_loss(terms, rho, fixed), rtol=1e-5)

    for _ in range(steps):
        state, metrics = step(state, batch)
    assert int(state.skipped_steps) == 0
    learned = as_vector(state.student.params["coefficients"])
    np.testing.assert_allclose(learned, optimum, atol=1e-4)
    # Only the coefficients are parameters; the merge sources came back unchanged.
    assert set(state.student.params) == {"coefficients"}
    np.testing.assert_array_equal(state.student.model_state["expert_merging"]["base"]["a"]["kernel"],
                                  base["a"]["kernel"])
    np.testing.assert_allclose(float(metrics["expert_merging/regularizer"]), np.sum((learned - INIT) ** 2) / 3,
                               rtol=1e-4)


def test_merged_params_equal_base_plus_coefficient_weighted_task_vectors():
    base, experts, _ = linear_problem()
    variables = expert_merging_variables(base, experts, init=INIT, chunks=CHUNKS, parametrization="linear")
    lam = np.array([0.7, -0.2, 0.4, 1.1, -0.5, 0.25])
    variables["params"]["coefficients"] = {k: jnp.asarray(v) for k, v in as_tree(lam).items()}
    merged = merged_params(variables)
    a = np.float64(base["a"]["kernel"]) + sum(l * da for l, (da, _) in zip(lam, directions(base, experts)))
    b = np.float64(base["b"]["kernel"]) + sum(l * db for l, (_, db) in zip(lam, directions(base, experts)))
    np.testing.assert_allclose(merged["a"]["kernel"], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["b"]["kernel"], b, rtol=1e-5, atol=1e-6)
    assert merged["a"]["kernel"].dtype == base["a"]["kernel"].dtype
    # A bfloat16 base and experts: merged in float32 (τ formed there, not rounded in bf16), returned in bf16.
    bf16 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
    variables16 = expert_merging_variables(bf16(base), [bf16(e) for e in experts], chunks=CHUNKS,
                                           parametrization="linear")
    variables16["params"]["coefficients"] = variables["params"]["coefficients"]
    merged16 = merged_params(variables16)["b"]["kernel"]
    up = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    b16 = up(base["b"]["kernel"]) + sum(l * (up(e["b"]["kernel"]) - up(base["b"]["kernel"])) * (db != 0)
                                        for l, e, (_, db) in zip(lam[2:], [experts[0], experts[0], experts[1], experts[1]],
                                                                 directions(base, experts)[2:]))
    assert merged16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged16, np.float64), up(b16), rtol=2.0**-8)  # one bf16 rounding

    # A leaf layer_of excludes stays at the base; a chunked group spans several leaves in name order; the
    # sigmoid parametrization starts at init.
    rng = np.random.default_rng(3)
    tree = lambda: {"dense": {"bias": rng.normal(size=(3,)).astype(np.float32),
                              "kernel": rng.normal(size=(2, 3)).astype(np.float32)},
                    "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}
    base2, experts2 = tree(), [tree(), tree()]
    variables = expert_merging_variables(base2, experts2, init=(0.2, 0.6), chunks={"dense": 3},
                                         layer_of=lambda p: None if p.startswith("norm") else p.split("/")[0])
    lam = np.array(coefficients(variables)["dense"])
    np.testing.assert_allclose(lam, [[0.2] * 3, [0.6] * 3], rtol=1e-6)
    merged = merged_params(variables)
    np.testing.assert_array_equal(merged["norm"]["scale"], base2["norm"]["scale"])
    # dense's 9 values (bias 3, then kernel 6, by name) in 3 chunks of 3: the bias is chunk 0, the kernel 1 and 2.
    base_flat = np.concatenate([base2["dense"]["bias"], base2["dense"]["kernel"].reshape(-1)]).astype(np.float64)
    flat = base_flat.copy()
    for i, e in enumerate(experts2):
        tv = np.concatenate([e["dense"]["bias"], e["dense"]["kernel"].reshape(-1)]) - base_flat
        flat = flat + np.repeat(lam[i], 3) * tv
    np.testing.assert_allclose(merged["dense"]["bias"], flat[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["dense"]["kernel"], flat[3:].reshape(2, 3), rtol=1e-5, atol=1e-6)


def loss_of(method, model, variables, experts, batch, raw):
    """The method's loss through the merged model, as a function of the raw coefficients (what the step
    differentiates)."""
    key = next(iter(variables["params"]))
    v = {**variables, "params": {key: raw}}
    merged = expert_merging_model(model, variables["expert_merging"]["base"], experts)
    x = jnp.concatenate([batch[k] for k in ENTRIES])
    outputs = {"student": merged.apply(v, x, train=True)}
    for name, entry, expert in zip(NAMES, ENTRIES, experts):
        outputs[name] = jax.lax.stop_gradient(model.apply({"params": expert}, batch[entry], train=False))
    inputs = LossInputs(outputs=outputs, batch=batch, step=jnp.zeros((), jnp.int32), variables={"student": v})
    return method.loss(method.init(None, inputs), inputs, jax.random.PRNGKey(0))[0]


@pytest.mark.parametrize("official", [False, True], ids=["linear_l2_mse", "sigmoid_l1_kd"])
def test_gradient_matches_float64_central_differences(official):
    with jax.enable_x64(True):
        base, experts, batch = linear_problem(np.float64)
        settings = (dict(features=("h",), task_weights=(1.0, 2.0), reg_weight=0.1, temperature=2.0) if official
                    else SETTINGS)
        method = methods.expert_merging(experts=NAMES, entries=ENTRIES, **settings)
        variables = expert_merging_variables(base, experts, init=INIT, chunks=CHUNKS,
                                             parametrization="sigmoid" if official else "linear")
        # Away from λ₀ (the L1 regularizer's kink, where a central difference sees 0 and the gradient sign(0) = 0).
        raw = {k: jnp.asarray(v, jnp.float64) + 0.1 * (np.arange(v.size).reshape(v.shape) - 1.5)
               for k, v in next(iter(variables["params"].values())).items()}
        f = jax.jit(lambda r: loss_of(method, linear_model(), variables, experts, batch, r))
        if official:  # the official configuration's value by NumPy: λ = sigmoid(raw), T²·KL, MSE, L1 from λ₀
            lam = 1.0 / (1.0 + np.exp(-as_vector(raw)))
            dirs = directions(base, experts)
            a = base["a"]["kernel"] + sum(l * da for l, (da, _) in zip(lam, dirs))
            b = base["b"]["kernel"] + sum(l * db for l, (_, db) in zip(lam, dirs))
            task = 0.0
            for alpha, entry, e in zip((1.0, 2.0), ENTRIES, experts):
                x, t = batch[entry], 2.0
                s_logits, t_logits = x @ (a + b) / t, x @ (e["a"]["kernel"] + e["b"]["kernel"]) / t
                log_q = s_logits - np.log(np.sum(np.exp(s_logits), axis=1, keepdims=True))
                log_p = t_logits - np.log(np.sum(np.exp(t_logits), axis=1, keepdims=True))
                kl = t * t * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1))
                task += alpha * (kl + np.mean((x @ a - x @ e["a"]["kernel"]) ** 2))
            expected = task / 2 + 0.1 * np.sum(np.abs(lam - INIT)) / 3
            np.testing.assert_allclose(float(f(raw)), expected, rtol=1e-10)
        grad = jax.grad(f)(raw)
        eps = 1e-6
        for k in raw:
            for idx in np.ndindex(raw[k].shape):
                up = {**raw, k: raw[k].at[idx].add(eps)}
                down = {**raw, k: raw[k].at[idx].add(-eps)}
                np.testing.assert_allclose(grad[k][idx], (f(up) - f(down)) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_a_tiny_mlp_trains_its_coefficients_in_the_jitted_step():
    model = models.get("mlp", num_classes=5, hidden_sizes=(8,))
    rng = np.random.default_rng(0)
    batch = {k: rng.normal(size=(4, 4, 4, 1)).astype(np.float32) for k in ENTRIES}
    base = model.init(jax.random.PRNGKey(0), batch["calib_0"])["params"]
    experts = [jax.tree.map(lambda p, s=s: p + 0.3 * jax.random.normal(jax.random.PRNGKey(s), p.shape), base)
               for s in (1, 2)]
    parts = expert_merging_participants(model, base, experts, entries=ENTRIES, names=NAMES)
    # A light regularizer: the official weight 5 (L1, pulling to the start) keeps this toy merge where it starts.
    method = methods.parse("expert_merging(experts=('expert_0', 'expert_1'), entries=('calib_0', 'calib_1'), "
                           "features=('hidden1',), temperature=2.0, reg_weight=0.01)")
    # The official optimizer (AdamW, weight decay 1e-5, clipped at norm 1) at a smaller rate than its 0.5, which
    # fits one calibration example per step and overshoots on this full batch.
    state = jaxkd.create(participants=parts, method=method, sample_batch=batch, rng=jax.random.PRNGKey(0),
                         tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=1e-5)))
    step = jaxkd.make_train_step()
    first = None
    for _ in range(5):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert int(state.step) == 5 and int(state.skipped_steps) == 0 and float(metrics["loss"]) < first
    lam = coefficients(state.student.variables())
    assert set(lam) == {"dense1", "fc"} and all(v.shape == (2, 1) for v in lam.values())
    assert all(0 < float(x) < 1 for v in lam.values() for x in np.ravel(v))
    merged = merged_params(state.student.variables())
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    # The served merged model is the plain MLP with the merged parameters.
    out = model.apply({"params": merged}, batch["calib_0"], train=False)
    ref = state.student_model.apply(state.student.variables(), batch["calib_0"], train=False)
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-6)


def test_layer_importance_and_chunk_plan():
    # Importance: Σ_i mean|λ_i| · ‖τ_i‖ / √n per layer, normalized; here τ is constant per layer.
    base = {"a": {"w": np.zeros((4,), np.float32)}, "b": {"w": np.zeros((16,), np.float32)}}
    experts = [{"a": {"w": np.full((4,), 1.0, np.float32)}, "b": {"w": np.full((16,), 0.5, np.float32)}},
               {"a": {"w": np.full((4,), 2.0, np.float32)}, "b": {"w": np.full((16,), 1.0, np.float32)}}]
    variables = expert_merging_variables(base, experts, init=(0.5, 0.25), parametrization="linear")
    raw = {"a": 0.5 * 1.0 + 0.25 * 2.0, "b": 0.5 * 0.5 + 0.25 * 1.0}  # RMS of a constant vector is the constant
    got = layer_importance(variables)
    np.testing.assert_allclose([got["a"], got["b"]], [raw["a"] / 1.5, raw["b"] / 1.5], rtol=1e-6)

    # Budget 13 over three layers: one each, the 10 extra in proportion 5:3:2.
    assert chunk_plan({"a": 0.5, "b": 0.3, "c": 0.2}, 13) == {"a": 6, "b": 4, "c": 3}
    # Layer a holds 3 parameters: capped at 3 chunks; the other 8 extra go 3:2 to b and c (4.8, 3.2 -> 5, 3).
    assert chunk_plan({"a": 0.5, "b": 0.3, "c": 0.2}, 13, sizes={"a": 3, "b": 100, "c": 100}) == {"a": 3, "b": 6, "c": 4}
    assert chunk_plan({"a": 0.0, "b": 0.0}, 2) == {"a": 1, "b": 1}
    # The plan feeds the model: chunks per layer.
    plan = chunk_plan(got, 6, sizes={"a": 4, "b": 16})
    assert plan == {"a": 4, "b": 2}  # 4 extra: a 2/3 -> 2.67, b 1/3 -> 1.33; the larger remainder goes to a
    chunked = expert_merging_variables(base, experts, chunks=plan)
    assert {g: v.shape for g, v in chunked["params"]["coefficient_logits"].items()} == {"a": (2, 4), "b": (2, 2)}


def test_bad_input_is_refused():
    base, experts, batch = linear_problem()
    model = linear_model()
    wider = {"a": {"kernel": np.zeros((D, C + 1), np.float32)}, "b": experts[1]["b"]}
    with pytest.raises(ValueError, match=r"models\[1\] differs from base at 'a/kernel': shape \(4, 4\)"):
        expert_merging_model(model, base, [experts[0], wider])
    with pytest.raises(ValueError, match=r"models\[0\]'s tree differs"):
        expert_merging_variables(base, [{"a": base["a"]}])
    with pytest.raises(ValueError, match="needs at least 1 model, got 0"):
        expert_merging_model(model, base, [])
    with pytest.raises(ValueError, match=r"chunks\['b'\] must be a positive integer, got 0"):
        expert_merging_variables(base, experts, chunks={"b": 0})
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        chunk_plan({"a": 1.0}, 0)
    with pytest.raises(ValueError, match="budget=1 is less than one chunk for each of the 2 layers"):
        chunk_plan({"a": 1.0, "b": 1.0}, 1)
    with pytest.raises(ValueError, match=r"init must lie in \(0, 1\)"):
        expert_merging_variables(base, experts, init=1.0)
    with pytest.raises(ValueError, match="2 entries for 1 experts"):
        methods.expert_merging(experts=("expert_0",), entries=ENTRIES)
    # A calibration entry missing from the batch is named when the state is created.
    parts = expert_merging_participants(model, base, experts, entries=ENTRIES, names=NAMES, parametrization="linear")
    method = methods.expert_merging(experts=NAMES, entries=ENTRIES)
    with pytest.raises(ValueError, match="calib_1"):
        jaxkd.create(participants=parts, method=method, tx=optax.sgd(0.1), sample_batch={"calib_0": batch["calib_0"]},
                     rng=jax.random.PRNGKey(0))
    # A student that is not a merged model has no coefficients to learn.
    plain = {"student": jaxkd.participants.student(model, input="calib_0"),
             "expert_0": jaxkd.Participant(model, {"params": experts[0]}, trains=False, input="calib_0")}
    with pytest.raises(ValueError, match="is not a merged model"):
        jaxkd.create(participants=plain, method=methods.expert_merging(experts=("expert_0",), entries=("calib_0",)),
                     tx=optax.sgd(0.1), sample_batch=batch, rng=jax.random.PRNGKey(0))


def test_on_an_fsdp_mesh_the_step_equals_one_device_and_the_merge_sources_are_sharded():
    """The merge sources are variables of the participant, so the train state shards them like parameters
    (fsdp over 8 simulated devices), and the sharded steps give the single-device coefficients and losses."""
    model = models.get("mlp", num_classes=8, hidden_sizes=(64,))  # dense1 kernel [16, 64]: big enough to split
    rng = np.random.default_rng(0)
    batch = {k: rng.normal(size=(8, 4, 4, 1)).astype(np.float32) for k in ENTRIES}
    base = model.init(jax.random.PRNGKey(0), batch["calib_0"])["params"]
    experts = [jax.tree.map(lambda p, s=s: p + 0.3 * jax.random.normal(jax.random.PRNGKey(s), p.shape), base)
               for s in (1, 2)]
    method = methods.parse("expert_merging(experts=('expert_0', 'expert_1'), entries=('calib_0', 'calib_1'), "
                           "features=('hidden1',), reg_weight=0.01)")

    def run(mesh):
        parts = expert_merging_participants(model, base, experts, entries=ENTRIES, names=NAMES)
        state = jaxkd.create(participants=parts, method=method, sample_batch=batch, rng=jax.random.PRNGKey(0),
                             tx=optax.adam(0.05), mesh=mesh)
        step, losses = jaxkd.make_train_step(mesh=mesh), []
        for _ in range(2):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    single, single_losses = run(None)
    sharded, sharded_losses = run(sharding.make_mesh({"fsdp": 8}))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 coefficients(sharded.student.variables()), coefficients(single.student.variables()))
    sources = sharded.student.variables()["expert_merging"]
    assert sources["base"]["dense1"]["kernel"].addressable_shards[0].data.shape == (16, 8)
    assert all(k.addressable_shards[0].data.shape == (16, 8) for k in sources["experts"]["dense1"]["dense1.kernel"])
