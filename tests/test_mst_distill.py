"""MST-Distill (Li et al., ACM MM 2025; official code Gray-OREO/MST-Distill, KD_methods/MST.py at commit
093b2fe): the routed top-k KD against NumPy, the load-balancing term and the MaskNet against the official
PyTorch computations transcribed here, the method's loss on hand-built inputs, which parameters each
objective trains (finite differences), the two stages in the jitted step, and the refused settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxkd
from jaxkd import losses, methods
from jaxkd.losses.logit.mst_distill import load_balancing
from jaxkd.methods.base import LossInputs, MethodVars
from jaxkd.methods.logit.mst_distill import mask_net_apply, mask_net_init
from jaxkd.models.base import Outputs
from tests.helpers import teacher_variables, tiny_batch, tiny_models


def np_log_softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(log_p, log_q):
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def np_topk_kd(zs, zt, probs, k, t):
    """(1/k) Σ_{i in top-k(probs)} T²·KL(p_ti ‖ p_s), per example, from the formula."""
    out = []
    for b in range(len(zs)):
        chosen = np.argsort(-probs[b], kind="stable")[:k]
        out.append(np.mean([t**2 * np_kl(np_log_softmax(zt[b, i], t), np_log_softmax(zs[b], t)) for i in chosen]))
    return np.array(out)


# Hand-built: 3 examples, 3 teachers, 4 classes; the router prefers a different teacher per example.
ZS = np.array([[1.0, 0.5, -0.5, 0.0], [0.2, -1.0, 0.3, 1.5], [-0.7, 0.0, 2.0, 0.4]], np.float32)
ZT = np.array([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0], [-1.0, -1.0, 3.0, 0.0]],
               [[1.0, 1.0, 1.0, -2.0], [0.5, -0.5, 0.0, 2.5], [3.0, 0.0, 0.0, 0.0]],
               [[0.0, 0.0, 0.0, 1.0], [-2.0, 1.0, 1.5, 0.0], [0.3, 0.2, 2.2, -0.1]]], np.float32)
PROBS = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.25, 0.65]], np.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_routed_kd_is_the_mean_kl_of_the_routers_top_k_teachers(k):
    got = losses.mst_distill(ZS, ZT, PROBS, k=k, temperature=2.0, reduction="none")
    np.testing.assert_allclose(got, np_topk_kd(ZS, ZT, PROBS, k, 2.0), rtol=1e-5)
    mask = np.array([True, False, True])
    np.testing.assert_allclose(losses.mst_distill(ZS, ZT, PROBS, k=k, temperature=2.0, mask=mask),
                               np_topk_kd(ZS, ZT, PROBS, k, 2.0)[mask].mean(), rtol=1e-5)


def test_router_probabilities_get_no_gradient_from_the_routed_kd():
    g = jax.grad(lambda p: losses.mst_distill(ZS, ZT, p, k=2))(jnp.asarray(PROBS))
    assert np.all(np.asarray(g) == 0.0)


def torch_load_balancing(gate_probs, mode):
    """KD_methods/MST.py, load_balancing_loss (commit 093b2fe), transcribed."""
    if mode == "KL":
        expert_avg_probs = gate_probs.mean(dim=0)
        uniform_dist = torch.ones_like(expert_avg_probs) / expert_avg_probs.size(0)
        return torch.nn.KLDivLoss(reduction="batchmean")(torch.log(expert_avg_probs), uniform_dist)
    importance = gate_probs.sum(dim=0)
    return importance.std() / importance.mean()


@pytest.mark.parametrize("mode", ["kl", "cv"])
def test_load_balancing_is_the_official_computation(mode):
    probs = np.asarray(jax.nn.softmax(np.random.default_rng(0).normal(size=(7, 4)) * 2, axis=-1), np.float64)
    want = torch_load_balancing(torch.tensor(probs), mode.upper()).item()
    np.testing.assert_allclose(load_balancing(probs.astype(np.float32), mode=mode), want, rtol=1e-5)
    # Padding examples route nothing: the value is that of the real rows.
    mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    want = torch_load_balancing(torch.tensor(probs[mask]), mode.upper()).item()
    np.testing.assert_allclose(load_balancing(probs.astype(np.float32), mode=mode, mask=mask), want, rtol=1e-5)


def torch_mask_net(params, feature, heads, dtype=torch.float32):
    """KD_methods/MST.py, MaskNet_1d.forward (commit 093b2fe) with the parameters of ``params`` loaded."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=dtype)
    d = feature.shape[-1]
    hidden = params["out_proj"]["kernel"].shape[0]
    embed = torch.nn.Linear(d, hidden * d).to(dtype)
    mha = torch.nn.MultiheadAttention(embed_dim=hidden, num_heads=heads, batch_first=True).to(dtype)
    fc = torch.nn.Linear(hidden, 1).to(dtype)
    with torch.no_grad():
        embed.weight.copy_(t(params["embed"]["kernel"]).T), embed.bias.copy_(t(params["embed"]["bias"]))
        mha.in_proj_weight.copy_(t(params["in_proj"]["kernel"]).T), mha.in_proj_bias.copy_(t(params["in_proj"]["bias"]))
        mha.out_proj.weight.copy_(t(params["out_proj"]["kernel"]).T)
        mha.out_proj.bias.copy_(t(params["out_proj"]["bias"]))
        fc.weight.copy_(t(params["fc"]["kernel"]).T), fc.bias.copy_(t(params["fc"]["bias"]))
        x = t(feature)
        x = embed(x).reshape(x.size(0), d, hidden)
        attn_output, _ = mha(x, x, x)
        return torch.sigmoid(fc(attn_output).squeeze(-1)).numpy()


def test_mask_net_is_the_official_attention_mask():
    params = mask_net_init(jax.random.PRNGKey(0), 12, heads=3, hidden_factor=2)  # hidden 12 // 6 * 3 = 6
    assert params["out_proj"]["kernel"].shape == (6, 6)
    params = jax.tree.map(lambda a: a + 0.1 * np.random.default_rng(1).normal(size=a.shape), params)  # non-zero biases
    feature = np.random.default_rng(2).normal(size=(2, 12)).astype(np.float32)
    np.testing.assert_allclose(mask_net_apply(params, feature, heads=3), torch_mask_net(params, feature, 3),
                               rtol=1e-5, atol=1e-6)


# Two teachers with a 6-wide `pooled` embedding and a dense `fc`, 4 classes, 3 examples.
D = 6


def hand_built_inputs(dtype=np.float32):
    rng = np.random.default_rng(3)
    outputs = {"student": Outputs(logits=ZS.astype(dtype), features={}, model_state={})}
    variables = {}
    for t in ("a", "b"):
        outputs[t] = Outputs(logits=np.zeros((3, 4), dtype), features={"pooled": rng.normal(size=(3, D)).astype(dtype)},
                             model_state={})
        variables[t] = {"params": {"fc": {"kernel": rng.normal(size=(D, 4)).astype(dtype),
                                          "bias": rng.normal(size=4).astype(dtype)}}}
    return LossInputs(outputs=outputs, batch={}, step=jnp.int32(0), variables=variables)


METHOD_ARGS = dict(teachers=("a", "b"), k=1, temperature=2.0, balance_weight=0.5, mask_heads=1, mask_hidden_factor=2)


def np_router(layers, z):
    for layer in layers:
        z = z @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_balance(probs):
    n = probs.shape[-1]
    return np.sum((1 / n) * (np.log(1 / n) - np.log(probs.mean(0)))) / n


def np_mask_net_one_head(params, f):
    """MaskNet_1d with one attention head, in NumPy (float64): tokens, softmax(q·kᵀ/√h)·v, read-out, sigmoid."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    lin = lambda layer, x: x @ layer["kernel"] + layer["bias"]
    b, d = f.shape
    h = p["out_proj"]["kernel"].shape[0]
    x = lin(p["embed"], f).reshape(b, d, h)
    q, k, v = np.split(lin(p["in_proj"], x), 3, axis=-1)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(h)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    return 1 / (1 + np.exp(-lin(p["fc"], lin(p["out_proj"], a @ v))[..., 0]))


def np_masked_logits(params, inputs, t):
    f = np.asarray(inputs.outputs[t].features["pooled"], np.float64)
    fc = inputs.variables[t]["params"]["fc"]
    m = np_mask_net_one_head(params["masks"][t], f)
    return (m * f) @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"], np.float64)


def test_method_loss_on_hand_built_inputs_is_the_papers_three_terms():
    inputs = hand_built_inputs()
    method = methods.mst_distill(**METHOD_ARGS)
    vars = method.init(jax.random.PRNGKey(0), inputs)
    value, aux = jax.jit(method.loss)(vars, inputs, jax.random.PRNGKey(1))
    # The one-head NumPy MaskNet is the official one (test_mask_net_is_the_official_attention_mask, 3 heads).
    f = np.asarray(inputs.outputs["a"].features["pooled"])
    np.testing.assert_allclose(np_mask_net_one_head(vars.params["masks"]["a"], f),
                               torch_mask_net(vars.params["masks"]["a"], f, 1), rtol=1e-5, atol=1e-6)
    zt = np.stack([np_masked_logits(vars.params, inputs, t) for t in ("a", "b")], axis=1)
    probs = np_router(vars.params["router"], ZS.astype(np.float64))
    kd = np_topk_kd(ZS, zt, probs, 1, 2.0).mean()
    balance = np_balance(probs)
    # Each mask pulls its teacher towards the student: T²·KL(p_s ‖ p_masked).
    mask_kd = sum(4.0 * np_kl(np_log_softmax(ZS, 2.0), np_log_softmax(zt[:, i], 2.0)).mean() for i in range(2))
    np.testing.assert_allclose(aux.metrics["kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["load_balance"], balance, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(aux.metrics["mask_kd"], mask_kd, rtol=1e-5)
    np.testing.assert_allclose(value, kd + 0.5 * balance + mask_kd, rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["route_a"], probs[:, 0].mean(), rtol=1e-5)


def central_differences(f, params, eps=1e-6):
    """Float64 central differences of a NumPy scalar function over every leaf entry of ``params``."""
    leaves, tree = jax.tree.flatten(jax.tree.map(lambda a: np.asarray(a, np.float64), params))
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros_like(leaf)
        for j in np.ndindex(leaf.shape):
            for sign in (1, -1):
                moved = [x.copy() for x in leaves]
                moved[i][j] += sign * eps
                g[j] += sign * f(jax.tree.unflatten(tree, moved)) / (2 * eps)
        grads.append(g)
    return jax.tree.unflatten(tree, grads)


def test_the_router_learns_from_load_balancing_only_and_each_mask_from_its_own_objective():
    """The official detaches the teachers in the routed KD and routes by top-k: the router's gradient is
    balance_weight·∂LB; each mask's is ∂(its T²·KL(p_s ‖ p_masked)) (the student detached)."""
    with jax.enable_x64(True):
        inputs = hand_built_inputs(np.float64)
        method = methods.mst_distill(**METHOD_ARGS)
        vars = method.init(jax.random.PRNGKey(0), inputs)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), vars.params)
        grads = jax.jit(jax.grad(lambda p: method.loss(MethodVars(params=p), inputs, jax.random.PRNGKey(1))[0]))(params)
        assert jax.tree.leaves(grads)[0].dtype == jnp.float64
        router_fd = central_differences(lambda r: 0.5 * np_balance(np_router(r, ZS.astype(np.float64))),
                                        params["router"])
        for g, fd in zip(jax.tree.leaves(grads["router"]), jax.tree.leaves(router_fd)):
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)

        def mask_objective(mask_params):
            zt = np_masked_logits({"masks": {"a": mask_params}}, inputs, "a")
            return 4.0 * np_kl(np_log_softmax(ZS, 2.0), np_log_softmax(zt, 2.0)).mean()

        mask_fd = central_differences(mask_objective, params["masks"]["a"])
        for g, fd in zip(jax.tree.leaves(grads["masks"]["a"]), jax.tree.leaves(mask_fd)):
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)


def metric(metrics, name):
    return metrics.get(name, metrics.get(f"mst_distill/{name}"))


def test_stages_in_the_jitted_step_masks_first_then_student_and_router_towards_balance():
    """mask_steps=2: the first two steps train only the masks (their objective falls), the next only the
    student and the router; a router started far from balance moves towards it (its only objective)."""
    teacher, student = tiny_models()
    batch = tiny_batch()
    method = methods.parse("mst_distill(teachers=('teacher', 'teacher2'), mask_steps=2)")
    participants = {n: jaxkd.Participant(teacher, teacher_variables(teacher, batch, seed=i + 1), trains=False)
                    for i, n in enumerate(("teacher", "teacher2"))}
    state = jaxkd.create(student=student, method=method, tx=optax.sgd(0.5), sample_batch=batch,
                         rng=jax.random.PRNGKey(0), participants=participants)
    params = state.method_vars.params["mst_distill"]
    router = [dict(layer) for layer in params["router"]]
    router[1]["bias"] = router[1]["bias"] + jnp.array([1.5, -1.5])  # starts routing almost all to "teacher"
    state = state.replace(method_vars=state.method_vars.replace(params={"mst_distill": {**params, "router": router}}))
    step = jaxkd.make_train_step()
    history = []
    for _ in range(6):
        before = jax.device_get((state.student.params, state.method_vars.params["mst_distill"]))
        state, metrics = step(state, batch)
        after = jax.device_get((state.student.params, state.method_vars.params["mst_distill"]))
        changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        history.append((changed(before[0], after[0]), changed(before[1]["masks"], after[1]["masks"]),
                        changed(before[1]["router"], after[1]["router"]), float(metric(metrics, "mask_kd")),
                        float(metric(metrics, "route_teacher")), float(metric(metrics, "load_balance"))))
    assert [h[:3] for h in history[:2]] == [(False, True, False)] * 2
    assert [h[:3] for h in history[2:]] == [(True, False, True)] * 4
    assert history[1][3] < history[0][3]  # the masks' objective fell while they trained
    # Routing moves towards balance, step after step.
    assert history[2][4] > 0.95 and history[-1][4] < history[2][4] - 0.05
    balance = [h[5] for h in history[2:]]
    assert all(b < a for a, b in zip(balance, balance[1:])), balance


@pytest.mark.parametrize("kwargs, match", [
    (dict(teachers=("teacher",)), "at least two teachers"),
    (dict(teachers=("teacher", "teacher")), "distinct"),
    (dict(teachers=("student", "teacher")), "cannot be one of its own teachers"),
    (dict(k=3), "exceeds the number of teachers"),
    (dict(k=0), "k"),
    (dict(temperature=0.0), "temperature"),
    (dict(balance_weight=-1.0), "balance_weight"),
    (dict(balance_mode="entropy"), "balance_mode"),
    (dict(mask_heads=0), "mask_heads"),
    (dict(mask_steps=-1), "mask_steps"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.mst_distill(**kwargs)


def test_bad_loss_inputs_are_refused():
    with pytest.raises(ValueError, match="exceeds the number of teachers"):
        losses.mst_distill(ZS, ZT, PROBS, k=4)
    with pytest.raises(ValueError, match="router_probs"):
        losses.mst_distill(ZS, ZT, PROBS[:, :2])
    with pytest.raises(ValueError, match=r"\[..., N, C\]"):
        losses.mst_distill(ZS, ZT[:, 0], PROBS)
    with pytest.raises(ValueError, match="no hidden width"):
        mask_net_init(jax.random.PRNGKey(0), 4, heads=3, hidden_factor=2)
