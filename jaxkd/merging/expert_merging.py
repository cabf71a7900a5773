"""Expert Merging: task-arithmetic merge coefficients learned by aligning the merged model with each expert.

Zhang et al., "Expert Merging: Model Merging with Unsupervised Expert Alignment and Importance-Guided Layer
Chunking" (2025, arXiv 2509.25712); official code Littleor/ExpertMerging (``global_utils/expert_merging_base.py``,
``global_utils/merging_utils.py``, commit 3b9a031). The merged parameters of layer ``l`` are

    θ_l(λ) = θ₀,l + Σ_i λ_{l,i} τ_{i,l},     τ_{i,l} = θ_{i,l} − θ₀,l

with one coefficient per layer and expert (Expert Merging++: one per *chunk* of a layer). This module is the
model side: :func:`expert_merging_model` wraps a :class:`~jaxkd.models.Model` into one whose only parameters
are the coefficients, so the ordinary train step learns them (the loss is the registered method
:func:`jaxkd.methods.expert_merging`); :func:`merged_params` turns the learned variables into the plain
parameter pytree to save or serve.

Variables of a wrapped model (``{"params": ..., "expert_merging": ..., <the model's other collections>}``):

* ``params`` — ``{"coefficient_logits": {group: [E, K]}}`` with the official sigmoid parametrization
  (λ = sigmoid(raw), so λ ∈ (0, 1), raw initialized at logit(init)), or ``{"coefficients": {group: [E, K]}}``
  with ``parametrization="linear"`` (λ = raw, unconstrained, as AdaMerging's). ``E`` experts, ``K`` chunks.
* ``expert_merging`` — a non-trained collection: ``"base"`` (the base parameters, the whole tree),
  ``"experts"`` (``{group: {leaf: [θ_1, ..., θ_E]}}``: each expert's leaves of the merged groups, in their own
  dtype) and ``"init"`` (``{group: [E, K]}`` the starting λ, which the regularizer measures from). The train
  state holds, shards and checkpoints it like batch statistics: nothing large is closed over by a compiled
  function. The experts are kept rather than ``τ`` so the task vectors are formed in float32 at merge time
  (a bfloat16 ``τ`` would round the small differences the merge is made of), at the memory of ``E`` copies
  of the merged leaves, as ``τ`` in the experts' dtype would take.

Group and leaf names are parameter paths with ``/`` written ``.`` (so checkpoints never see a ``/`` key); the
variables are self-describing: :func:`merged_params` needs nothing else.

Layers. A *group* is the set of parameter leaves that share one coefficient per expert. ``layer_of(path)``
maps each leaf's path (``"block_0/attention/query/kernel"``) to its group name, or to ``None`` to keep that
leaf at the base (the official code excludes norms, biases, embeddings and the LM head by regex). The
default, :func:`top_level`, groups by the first path component (``"block_0"``, ``"Dense_0"``); the official
code gives every parameter tensor its own coefficients: ``layer_of=lambda path: path``.

Chunks (Expert Merging++). A group with ``K`` chunks has ``K`` coefficients per expert: its leaves, flattened
and concatenated in name order, are cut into ``K`` contiguous chunks and chunk ``k`` of every task vector
is scaled by ``λ_{l,i,k}``. The official ``scale_tensor_by_coeffs`` cuts one tensor with ``torch.chunk``
(chunks of ``ceil(n / K)``, the last shorter, and fewer than ``K`` chunks when ``K`` does not divide well);
here the chunks are as equal as possible (``numpy.array_split``: the first ``n mod K`` one value longer), so
every coefficient scales something. The two agree whenever ``K`` divides ``n``.

The official code leaves how many chunks each layer gets to a hand-written ``coeffs_size_dict``; the paper
derives it from a normalized layer importance. :func:`layer_importance` and :func:`chunk_plan` are our
reading of that description (learned coefficients × task-vector magnitudes, normalized by parameter count;
chunks allocated in proportion), not a transcription: see their docstrings.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd.merging.trees import check_count, check_same_structure, compute_dtype, like_base
from jaxkd.models.base import Model, Outputs
from jaxkd.participants import Participant, param_path

__all__ = [
    "COLLECTION",
    "chunk_plan",
    "coefficients",
    "expert_merging_model",
    "expert_merging_participants",
    "expert_merging_variables",
    "layer_importance",
    "merged_params",
    "top_level",
]

PyTree = Any
METHOD = "expert_merging"
#: The variable collection holding the base, the experts and the initial coefficients.
COLLECTION = "expert_merging"
#: The parameter key of each parametrization (which one a variables tree uses is read from it).
SIGMOID_KEY, LINEAR_KEY = "coefficient_logits", "coefficients"
PARAMETRIZATIONS = {"sigmoid": SIGMOID_KEY, "linear": LINEAR_KEY}


def top_level(path: str) -> str:
    """The default layer of a parameter: the first component of its path (``"block_0/mlp/kernel" -> "block_0"``)."""
    return path.split("/", 1)[0]


def _key(path: str) -> str:
    return path.replace("/", ".")


def _leaf_paths(tree: PyTree) -> list[tuple[str, Any]]:
    return [(param_path(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _group_leaves(base: PyTree, layer_of: Callable[[str], str | None]) -> dict[str, list[str]]:
    """``{group key: [leaf key, ...]}`` (both sorted) of every leaf ``layer_of`` assigns a group."""
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for path, _ in _leaf_paths(base):
        key = _key(path)
        if key in seen:
            raise ValueError(f"{METHOD}: parameter paths {seen[key]!r} and {path!r} coincide once '/' is written '.'")
        seen[key] = path
        group = layer_of(path)
        if group is None:
            continue
        if not isinstance(group, str) or not group:
            raise ValueError(f"{METHOD}: layer_of must return a non-empty group name or None, got {group!r} "
                             f"for {path!r}")
        groups.setdefault(_key(group), []).append(key)
    if not groups:
        raise ValueError(f"{METHOD}: layer_of assigns no parameter to a layer, so there is nothing to merge")
    return {g: sorted(leaves) for g, leaves in sorted(groups.items())}


def _init_values(init: Any, count: int, parametrization: str) -> np.ndarray:
    """One starting λ per expert, checked: in (0, 1) for the sigmoid parametrization (logit(λ) must exist)."""
    values = [init] * count if isinstance(init, numbers.Real) and not isinstance(init, bool) else init
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{METHOD}: init must be a number or one number per expert, got {init!r}")
    if len(values) != count:
        raise ValueError(f"{METHOD}: init has {len(values)} entries for {count} experts")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{METHOD}: init[{i}] must be a finite number, got {v!r}")
        if parametrization == "sigmoid" and not 0.0 < v < 1.0:
            raise ValueError(f"{METHOD}: with the sigmoid parametrization init must lie in (0, 1), got init[{i}]={v!r}")
        out.append(float(v))
    return np.asarray(out, np.float64)


def _group_sizes(base: PyTree, groups: Mapping[str, Sequence[str]]) -> dict[str, int]:
    sizes = {_key(path): int(np.size(leaf)) for path, leaf in _leaf_paths(base)}
    return {g: sum(sizes[leaf] for leaf in leaves) for g, leaves in groups.items()}


def _check_chunks(chunks: Mapping[str, int] | None, groups: Mapping[str, Sequence[str]],
                  sizes: Mapping[str, int]) -> dict[str, int]:
    if chunks is None:
        return {g: 1 for g in groups}
    if not isinstance(chunks, Mapping):
        raise ValueError(f"{METHOD}: chunks must map layer names to chunk counts, got {type(chunks).__name__}")
    chunks = {_key(g): k for g, k in chunks.items()}
    unknown = sorted(set(chunks) - set(groups))
    if unknown:
        raise ValueError(f"{METHOD}: chunks names layers {unknown} that are not merged; the layers are {sorted(groups)}")
    out = {}
    for g in groups:
        k = chunks.get(g, 1)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{METHOD}: chunks[{g!r}] must be a positive integer, got {k!r}")
        if k > sizes[g]:
            raise ValueError(f"{METHOD}: chunks[{g!r}]={k} is more than the layer's {sizes[g]} parameters")
        out[g] = int(k)
    return out


def expert_merging_variables(
    base: PyTree,
    experts: Sequence[PyTree],
    *,
    init: float | Sequence[float] = 0.1,
    layer_of: Callable[[str], str | None] | None = None,
    chunks: Mapping[str, int] | None = None,
    parametrization: str = "sigmoid",
    model_state: Mapping[str, PyTree] | None = None,
) -> dict[str, PyTree]:
    """The starting variables of a merged model: coefficients at ``init`` and the merge sources (see the module).

    Args:
      base: the base (pre-trained) parameters.
      experts: one parameter pytree per expert, each with ``base``'s tree and shapes. One expert is allowed:
        its layer-wise scaling is still learned (a task vector's strength per layer); merging needs two.
      init: the starting λ, one number or one per expert. Default 0.1, the official CLI's default
        (``--scaling_coefficient``, passed as ``weight_coeffs_init_value``).
      layer_of: leaf path -> group name, or ``None`` to keep that leaf at the base; default :func:`top_level`.
      chunks: ``{group: K}`` coefficients per expert for the groups named (Expert Merging++); default 1 each.
      parametrization: ``"sigmoid"`` (official: λ = sigmoid(raw) ∈ (0, 1)) or ``"linear"`` (λ = raw).
      model_state: the model's other collections (``{"batch_stats": ...}`` of the base), kept as they are.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"{METHOD}: parametrization must be one of {tuple(PARAMETRIZATIONS)}, got {parametrization!r}")
    check_count(experts, 1, METHOD)
    check_same_structure(base, list(experts), method=METHOD)
    layer_of = top_level if layer_of is None else layer_of
    if not callable(layer_of):
        raise ValueError(f"{METHOD}: layer_of must be a function of a parameter path, got {layer_of!r}")
    groups = _group_leaves(base, layer_of)
    sizes = _group_sizes(base, groups)
    counts = _check_chunks(chunks, groups, sizes)
    lam0 = _init_values(init, len(experts), parametrization)
    if model_state is not None and (not isinstance(model_state, Mapping) or {"params", COLLECTION} & set(model_state)):
        raise ValueError(f"{METHOD}: model_state is the model's collections other than 'params' (e.g. "
                         f"{{'batch_stats': ...}}), got {model_state!r:.80}")

    expert_leaves = [dict((_key(p), leaf) for p, leaf in _leaf_paths(e)) for e in experts]
    # Coefficients in the merge's working precision: float64 for a float64 base (float64 checks), else float32.
    dt = jnp.float64 if any(jnp.result_type(leaf) == jnp.float64 for leaf in jax.tree.leaves(base)) else jnp.float32
    init_tree = {g: jnp.asarray(np.repeat(lam0[:, None], counts[g], axis=1), dt) for g in groups}
    raw = {g: (jax.scipy.special.logit(v) if parametrization == "sigmoid" else v) for g, v in init_tree.items()}
    sources = {
        "base": base,
        "experts": {g: {leaf: [e[leaf] for e in expert_leaves] for leaf in leaves} for g, leaves in groups.items()},
        "init": init_tree,
    }
    return {"params": {PARAMETRIZATIONS[parametrization]: raw}, COLLECTION: sources, **dict(model_state or {})}


def _parts(variables: Mapping[str, PyTree]) -> tuple[dict[str, jax.Array], Mapping[str, PyTree], str]:
    """``(raw coefficients by group, merge sources, parametrization)`` of a merged model's variables."""
    if not isinstance(variables, Mapping) or COLLECTION not in variables or "params" not in variables:
        raise ValueError(f"{METHOD}: expected the variables of an expert_merging_model ({{'params': ..., "
                         f"{COLLECTION!r}: ...}}), got {sorted(variables) if isinstance(variables, Mapping) else variables!r:.80}")
    params = variables["params"]
    for parametrization, key in PARAMETRIZATIONS.items():
        if key in params:
            return params[key], variables[COLLECTION], parametrization
    raise ValueError(f"{METHOD}: the params hold neither {SIGMOID_KEY!r} nor {LINEAR_KEY!r}: {sorted(params)}")


def coefficients(variables: Mapping[str, PyTree]) -> dict[str, jax.Array]:
    """``{group: [E, K]}`` the merge coefficients λ (after the sigmoid, when the parametrization has one)."""
    raw, _, parametrization = _parts(variables)
    act = jax.nn.sigmoid if parametrization == "sigmoid" else (lambda x: x)
    return {g: act(jnp.asarray(v)) for g, v in raw.items()}


def _segments(offset: int, size: int, total: int, chunks: int) -> tuple[list[int], list[int]]:
    """The chunks (``numpy.array_split`` of ``total`` values into ``chunks``) that values ``[offset, offset+size)``
    fall in, and how many values of each: ``(chunk ids, counts)``."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.empty(total, np.int8), chunks)])
    ids, counts = [], []
    for k in range(chunks):
        lo, hi = max(offset, bounds[k]), min(offset + size, bounds[k + 1])
        if hi > lo:
            ids.append(k)
            counts.append(int(hi - lo))
    return ids, counts


def merged_params(variables: Mapping[str, PyTree]) -> PyTree:
    """The merged parameters ``θ₀ + Σ_i λ_{l,i(,k)} τ_i`` of a merged model's variables, as a plain pytree with the
    base's structure and dtypes (what the original model applies, saves or serves). Computed in float32
    (float64 for float64 bases); jittable and differentiable in the coefficients."""
    _, sources, _ = _parts(variables)
    lam = coefficients(variables)
    base, experts = sources["base"], sources["experts"]
    group_of = {leaf: g for g, leaves in experts.items() for leaf in leaves}
    offsets: dict[str, int] = {}
    sizes = {g: 0 for g in experts}
    for g, leaves in experts.items():
        for leaf in sorted(leaves):
            offsets[leaf] = sizes[g]
            sizes[g] += int(np.size(leaves[leaf][0]))

    def merge(path, base_leaf):
        key = _key(param_path(path))
        g = group_of.get(key)
        if g is None:
            return base_leaf
        dt = compute_dtype(base_leaf)
        b = jnp.asarray(base_leaf).astype(dt)
        coef = lam[g].astype(dt)  # [E, K]
        ids, counts = _segments(offsets[key], int(np.size(base_leaf)), sizes[g], coef.shape[1])
        if len(ids) == 1:
            scale = coef[:, ids[0]].reshape((-1,) + (1,) * b.ndim)
        else:  # the leaf spans several chunks: one coefficient per value, repeated over each chunk's values
            per_value = jnp.repeat(coef[:, np.asarray(ids)], np.asarray(counts), axis=1,
                                   total_repeat_length=int(np.size(base_leaf)))
            scale = per_value.reshape((coef.shape[0],) + b.shape)
        tv = jnp.stack([jnp.asarray(e).astype(dt) - b for e in experts[g][key]])
        return like_base(b + jnp.sum(scale * tv, axis=0), base_leaf)

    return jax.tree_util.tree_map_with_path(merge, base)


def layer_importance(variables: Mapping[str, PyTree]) -> dict[str, float]:
    """Each merged group's normalized importance (non-negative, summing to 1), for :func:`chunk_plan`.

    ``I_l ∝ Σ_i mean_k |λ_{l,i,k}| · ‖τ_{i,l}‖₂ / √n_l`` — the coefficient-weighted root-mean-square change the
    experts make to a parameter of layer ``l`` (``n_l`` parameters). The paper names its ingredients (learned
    coefficients, task-vector magnitudes, parameter counts) and normalizes; the official code ships no
    implementation (chunk counts are a hand-set ``coeffs_size_dict``), so this exact form is ours. Host-side
    (returns Python floats).
    """
    _, sources, _ = _parts(variables)
    lam = {g: np.asarray(v, np.float64) for g, v in coefficients(variables).items()}
    flat_base = {_key(p): np.asarray(leaf, np.float64) for p, leaf in _leaf_paths(sources["base"])}
    raw = {}
    for g, leaves in sources["experts"].items():
        count = sum(flat_base[leaf].size for leaf in leaves)
        norms = np.sqrt([sum(np.sum((np.asarray(leaves[leaf][i], np.float64) - flat_base[leaf]) ** 2)
                             for leaf in leaves) for i in range(lam[g].shape[0])])
        raw[g] = float(np.sum(np.mean(np.abs(lam[g]), axis=1) * norms) / math.sqrt(count))
    total = sum(raw.values())
    if not total > 0:
        return {g: 1.0 / len(raw) for g in raw}  # no expert moves any merged layer: no layer stands out
    return {g: v / total for g, v in raw.items()}


def chunk_plan(importance: Mapping[str, float], budget: int, *, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """How many chunks (coefficients per expert) each layer gets out of ``budget`` in all (Expert Merging++).

    Every layer keeps one coefficient; the ``budget − L`` extra chunks go to the ``L`` layers in proportion to
    their ``importance`` (largest remainders, ties to the earlier name), never more than a layer's parameter
    count in ``sizes`` (what a capped layer cannot take goes to the others). High-importance layers get
    finer coefficients, low-importance ones stay at one, as the paper describes; the proportional rule is
    ours (the official code takes the counts as input). Pass the result as ``chunks=`` to
    :func:`expert_merging_model`.

    Args:
      importance: ``{layer: I ≥ 0}``, e.g. :func:`layer_importance` (need not sum to 1).
      budget: the total number of chunks, at least one per layer.
      sizes: ``{layer: parameter count}`` caps; default uncapped.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise ValueError(f"chunk_plan: budget must be a positive integer (chunks in all), got {budget!r}")
    if not isinstance(importance, Mapping) or not importance:
        raise ValueError("chunk_plan: importance must be a non-empty mapping {layer: importance}")
    names = list(importance)
    weights = np.asarray([float(importance[n]) for n in names], np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"chunk_plan: importances must be finite and >= 0, got {dict(importance)}")
    if budget < len(names):
        raise ValueError(f"chunk_plan: budget={budget} is less than one chunk for each of the {len(names)} layers")
    caps = np.full(len(names), np.iinfo(np.int64).max, np.int64)
    if sizes is not None:
        missing = [n for n in names if n not in sizes]
        if missing:
            raise ValueError(f"chunk_plan: sizes lacks layers {missing}")
        caps = np.asarray([int(sizes[n]) for n in names], np.int64)
        if np.any(caps < 1):
            raise ValueError(f"chunk_plan: every layer size must be >= 1, got {dict(sizes)}")
    counts = np.ones(len(names), np.int64)
    extra = budget - len(names)
    while extra > 0:
        open_ = counts < caps
        if not open_.any():
            break  # every layer is at one chunk per parameter: the rest of the budget has nowhere to go
        w = np.where(open_, weights, 0.0)
        w = w / w.sum() if w.sum() > 0 else open_ / open_.sum()
        share = w * extra
        add = np.minimum(np.floor(share).astype(np.int64), caps - counts)
        left = extra - int(add.sum())
        remainder = np.where(open_ & (counts + add < caps), share - np.floor(share), -1.0)
        for i in np.argsort(-remainder, kind="stable")[:left]:
            if remainder[i] < 0:
                break
            add[i] += 1
        if add.sum() == 0:
            break
        counts += add
        extra -= int(add.sum())
    return dict(zip(names, (int(c) for c in counts)))


def expert_merging_model(
    model: Model,
    base: PyTree,
    experts: Sequence[PyTree],
    *,
    init: float | Sequence[float] = 0.1,
    layer_of: Callable[[str], str | None] | None = None,
    chunks: Mapping[str, int] | None = None,
    parametrization: str = "sigmoid",
    model_state: Mapping[str, PyTree] | None = None,
    name: str | None = None,
) -> Model:
    """``model`` with parameters ``θ₀ + Σ λ τ`` whose only trainable parameters are the coefficients λ.

    ``init(rng, x)`` returns :func:`expert_merging_variables` (the arguments are those of that function): a
    trained participant built from this model without variables starts there. Its compiled init holds the
    base and the experts as constants, so for a large model pass the variables instead
    (``jaxkd.participants.student(merged, expert_merging_variables(...))``, or
    :func:`expert_merging_participants`). ``apply`` merges, then applies ``model`` in inference mode
    (``train=False`` whatever it is asked: batch statistics stay the base's and there is no dropout — the
    coefficients are fitted to the network as it will be served) and returns its logits and features; the
    merge sources come back unchanged as model state.
    """
    if not isinstance(model, Model):
        raise ValueError(f"{METHOD}: model must be a jaxkd.models.Model, got {type(model).__name__}")
    variables = expert_merging_variables(base, experts, init=init, layer_of=layer_of, chunks=chunks,
                                         parametrization=parametrization, model_state=model_state)
    others = tuple(k for k in variables if k not in ("params", COLLECTION))

    def init_fn(rng, x):
        abstract = jax.eval_shape(model.init, rng, x)
        check_same_structure(abstract["params"], [base], method=METHOD, reference_name="the model's parameters")
        missing = sorted(set(abstract) - {"params"} - set(others))
        if missing:
            raise ValueError(f"{METHOD}: the model has collections {missing} besides 'params': pass the base's as "
                             f"model_state={{...}}")
        return variables

    def apply(variables, x, *, train: bool = False, rngs=None):
        del train  # always inference mode (see above)
        inner = {"params": merged_params(variables), **{k: v for k, v in variables.items() if k not in ("params", COLLECTION)}}
        out = model.apply(inner, x, train=False, rngs=rngs)
        return Outputs(logits=out.logits, features=out.features,
                       model_state={COLLECTION: variables[COLLECTION], **out.model_state})

    return Model(init=init_fn, apply=apply, name=name or f"expert_merging({model.name})")


def _concatenated(entries: tuple[str, ...]) -> Callable[[Mapping[str, Any]], jax.Array]:
    def read(batch):
        missing = [k for k in dict.fromkeys(entries) if k not in batch]
        if missing:
            raise ValueError(f"{METHOD}: calibration entries {missing} are missing from the batch, which has "
                             f"{sorted(batch)}")
        return jnp.concatenate([jnp.asarray(batch[k]) for k in entries], axis=0)

    return read


def expert_merging_participants(
    model: Model,
    base: PyTree,
    experts: Sequence[PyTree],
    *,
    entries: Sequence[str],
    names: Sequence[str] | None = None,
    expert_state: Sequence[Mapping[str, PyTree]] | None = None,
    **merge: Any,
) -> dict[str, Participant]:
    """The participants of an Expert Merging run, for ``jaxkd.create(participants=...)``.

    ``"student"``: the merged model (:func:`expert_merging_model`, ``merge`` its keyword arguments), trained,
    reading every calibration entry concatenated along the example axis in ``entries``' order (one forward
    pass; the method cuts the outputs back per entry). ``names[i]`` (default ``"expert_<i>"``): expert ``i``,
    frozen, reading ``batch[entries[i]]``, with ``expert_state[i]`` as its other collections. Pass the same
    ``entries`` and ``names`` to :func:`jaxkd.methods.expert_merging`.
    """
    check_count(experts, 1, METHOD)
    if isinstance(entries, str) or not isinstance(entries, Sequence) or len(entries) != len(experts) \
            or not all(isinstance(k, str) for k in entries):
        raise ValueError(f"{METHOD}: entries must name one calibration batch entry per expert ({len(experts)}), "
                         f"got {entries!r}")
    names = tuple(names) if names is not None else tuple(f"expert_{i}" for i in range(len(experts)))
    if len(names) != len(experts) or len(set(names)) != len(names) or "student" in names:
        raise ValueError(f"{METHOD}: names must be {len(experts)} distinct participant names other than "
                         f"'student', got {names!r}")
    states = [{}] * len(experts) if expert_state is None else list(expert_state)
    if len(states) != len(experts):
        raise ValueError(f"{METHOD}: expert_state has {len(states)} entries for {len(experts)} experts")
    merged = expert_merging_model(model, base, experts, **merge)
    variables = expert_merging_variables(base, experts, **{k: v for k, v in merge.items() if k != "name"})
    out = {"student": Participant(merged, variables, trains=True, input=_concatenated(tuple(entries)))}
    for name, entry, expert, state in zip(names, entries, experts, states):
        out[name] = Participant(model, {"params": expert, **dict(state)}, trains=False, input=entry)
    return out
