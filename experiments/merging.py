"""Model merging on digits: experts fine-tuned from one base on disjoint class subsets, merged back into one
model by every method of :mod:`jaxkd.merging`; print a table (offline, 2 CPU cores).

    python -m experiments.merging                          # experiments/configs/digits_merging.py (~1.6 min)
    python -m experiments.merging --set seeds=(0,) --set expert_steps=100
    python -m experiments.merging --set "merges.ties_d05={'method': 'ties', 'density': 0.5}"

Per seed:

1. Data: scikit-learn's digits (the library's ``digits`` loader). ``val_per_class`` training images of every
   class are held out as the validation split (the same for every seed, ``data_seed``); the rest is the
   training split. Subset ``k`` of ``subsets`` (default ``{0,1,2}``, ``{3,4,5}``, ``{6,7,8,9}``) owns the
   training images of its classes.
2. The BASE: ``model`` (a small MLP) trained with cross-entropy on the whole training split for only
   ``base_steps`` steps, so that it is a weak generalist.
3. The EXPERTS: one copy of the base per subset, fine-tuned with cross-entropy on that subset's training
   images for ``expert_steps`` steps. Every expert keeps the 10-way head, so it forgets the other classes.
   The MULTITASK reference: the base fine-tuned on every subset jointly (the union of the subsets' images) for
   ``multitask_steps`` steps (default: the experts' steps together).
4. Every merge of ``merges`` (:mod:`jaxkd.merging`; nothing trains): the soup (``linear``, uniform weights),
   task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023), TIES (Yadav et al.,
   NeurIPS 2023), DARE and DARE-TIES (Yu et al., "Language Models are Super Mario", ICML 2024), breadcrumbs
   (Davari & Belilovsky, 2024), DELLA (Deep et al., 2024), SLERP, FuseChat's VaRM (``variation_ratio``) and SCE.
   The task-vector merges (``"scaled": True``) are scaled ``merged = base + λ·(merge − base)`` (task
   arithmetic's λ, TIES' λ), λ grid-searched over ``scale_grid`` on the validation split's accuracy, as is
   standard, and reported. SLERP interpolates two models: by default experts 0 and 1 (``"models": (0, 1)``),
   so the third subset is not in it.
   Then the merges that learn (``learned``):

   * ``expert_merging`` (:mod:`jaxkd.merging.expert_merging`, Zhang et al. 2025): one coefficient per layer
     and expert, trained to align the merged model with each expert on unlabeled calibration batches
     (``calibration_per_subset`` training images of each subset; labels unused), with the official settings
     (init 0.1, AdamW lr 0.5, regularizer weight 5) and, as ``expert_merging_no_reg``, without the
     regularizer;
   * ``twin_merging`` (:mod:`jaxkd.merging.twin_merging`, Lu et al., NeurIPS 2024): the shared task-arithmetic
     merge plus each expert's rank-``rank`` exclusive knowledge, merged per input by a router trained on the
     validation split (each image labeled with its subset);
   * ``scalearn`` (:mod:`jaxkd.merging.scalearn`, Frohmann et al. 2024): the frozen experts' features scaled by
     learned ``ω`` and summed, with a new head, trained for the target task — all ten classes — on a small
     labeled subset of the training split (``labels_per_class`` images per class).

5. Accuracy of every model on the test split: per subset (the test images of that subset's classes, argmax
   over all ten classes) and overall, mean ± std over seeds, printed as a Markdown table and written to
   ``results.md``/``results.json``.

Resumable: every trained stage (base, experts, multitask, the learned merges) runs through
:class:`experiments.runner.Runner` with its checkpoints under ``checkpoints/seed<seed>/<stage>`` and its
final variables under ``stages/seed<seed>/<stage>``; each merge's scores are written to
``merges/seed<seed>/<merge>.json``. Re-running the same command with the same ``--out`` reuses every finished
stage and merge and resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxkd
from jaxkd import data, merging, methods, models
from jaxkd.checkpoint import load_variables, save_variables

from experiments import config as config_lib
from experiments import report
from experiments.run_log import PreemptionFlag
from experiments.runner import Evaluation, Runner, entry_point, progress_bar, run_command
from experiments.timing import Phases


def _default_merges() -> dict[str, dict[str, Any]]:
    return {
        "linear": {"method": "linear"},
        "task_arithmetic": {"method": "task_arithmetic", "scaled": True},
        "ties": {"method": "ties", "density": 0.2, "scaled": True},
        "dare": {"method": "dare", "density": 0.3, "scaled": True},
        "dare_ties": {"method": "dare", "density": 0.3, "consensus": "ties", "scaled": True},
        "breadcrumbs": {"method": "breadcrumbs", "density": 0.8, "gamma": 0.01, "scaled": True},
        "della": {"method": "della", "density": 0.3, "epsilon": 0.1, "scaled": True},
        "slerp": {"method": "slerp", "t": 0.5, "models": (0, 1)},
        "variation_ratio": {"method": "variation_ratio", "scaled": True},
        "sce": {"method": "sce", "select_topk": 0.1, "scaled": True},
    }


def _default_learned() -> dict[str, dict[str, Any]]:
    expert_merging = {"method": "expert_merging", "steps": 100, "lr": 0.5, "calibration_per_subset": 32,
                      "batch_size": 16, "reg_weight": 5.0}
    return {
        "expert_merging": expert_merging,
        # The official regularizer weight holds the coefficients at their start here (see the report).
        "expert_merging_no_reg": {**expert_merging, "reg_weight": 0.0},
        "twin_merging": {"method": "twin_merging", "rank": 8, "scaling": 0.3, "steps": 200, "lr": 5e-3},
        "scalearn": {"method": "scalearn", "steps": 100, "lr": 0.01, "labels_per_class": 5},
    }


@dataclasses.dataclass(frozen=True)
class MergingExperiment:
    """One merging experiment (a config file's ``get_config()`` returns one).

    Attributes:
      name: the run folder's prefix.
      dataset, data_dir: the image data set (``jaxkd.data.load_split``) and its TFDS folder.
      model, model_kwargs: the architecture (``jaxkd.models.get``) of the base, experts and merges.
      subsets: disjoint tuples of classes, one expert each.
      val_per_class: training images per class held out as the validation split (λ search, the twin router).
      base_steps, base_lr: the base's training on the whole training split (short: a weak generalist).
      expert_steps, expert_lr: each expert's fine-tuning on its subset.
      multitask_steps: the multitask reference's fine-tuning on every subset jointly (None: expert_steps times
        the number of subsets, the experts' compute together).
      batch_size, momentum, weight_decay: SGD with momentum and a cosine schedule, for every trained stage.
      scale_grid: the λ candidates of the ``scaled`` merges.
      merges: row name -> ``{"method": <jaxkd.merging function>, **its keyword arguments}``, plus
        ``"scaled": True`` (λ searched) and, for two-model merges (slerp), ``"models": (i, j)``: the experts merged.
      learned: row name -> ``{"method": "expert_merging" | "twin_merging" | "scalearn", **settings}``, the merges
        that learn something (see :data:`LEARNED` for each one's settings).
      seeds: every stage is repeated per seed (initialization, data order, DARE's drops).
      data_seed: fixes the validation split and the calibration / ScaLearn subsets.
    """

    name: str = "digits_merging"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"hidden_sizes": (64, 64)})
    subsets: tuple = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))
    val_per_class: int = 10
    base_steps: int = 20
    base_lr: float = 0.05
    expert_steps: int = 150
    expert_lr: float = 0.02
    multitask_steps: int | None = None
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    scale_grid: tuple = tuple(round(0.05 * i, 2) for i in range(1, 21)) + (1.25, 1.5, 2.0)
    merges: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_default_merges)
    learned: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=_default_learned)
    seeds: tuple = (0, 1, 2)
    data_seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 100
    tensorboard: bool = True
    out_dir: str = "runs"
    compilation_cache: str | None = "default"

    def check(self) -> None:
        """Checks across fields (after every field's own)."""
        classes = [c for s in self.subsets for c in s]
        if len(self.subsets) < 2 or any(not s for s in self.subsets) or len(set(classes)) != len(classes):
            raise ValueError(f"subsets must be at least two disjoint, non-empty tuples of classes, got "
                             f"subsets={self.subsets!r}")
        for name, spec in self.merges.items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), str):
                raise ValueError(f"merges[{name!r}] must be a dict with a 'method' (a jaxkd.merging function), "
                                 f"got {spec!r}")
        if not self.scale_grid or any(not isinstance(v, (int, float)) or v <= 0 for v in self.scale_grid):
            raise ValueError(f"scale_grid must be positive numbers, got {self.scale_grid!r}")
        for name, spec in self.learned.items():
            if not isinstance(spec, Mapping) or spec.get("method") not in LEARNED:
                raise ValueError(f"learned[{name!r}] must be a dict with a 'method' in {sorted(LEARNED)}, got {spec!r}")
            if name in self.merges:
                raise ValueError(f"{name!r} is both a merge and a learned merge: rename one")


MergingExperiment.CHECKS = {
    **{name: config_lib.at_least(1) for name in
       ("base_steps", "expert_steps", "batch_size", "val_per_class", "eval_every")},
    "multitask_steps": config_lib.optional(config_lib.at_least(1)), "checkpoint_every": config_lib.at_least(0),
    "base_lr": config_lib.positive, "expert_lr": config_lib.positive, "weight_decay": config_lib.nonnegative,
    "momentum": config_lib.check_momentum, "seeds": config_lib.check_seeds, "data_seed": config_lib.at_least(0),
}

#: The default run's config file.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits_merging.py")


# ----- data -----


@dataclasses.dataclass(frozen=True)
class Data:
    train: data.Split  # the training split less the validation images
    val: data.Split
    test: data.Split
    mean: tuple
    std: tuple
    subsets: tuple  # tuples of classes

    def of_subset(self, split: data.Split, k: int) -> data.Split:
        return split.subset(np.flatnonzero(np.isin(split.labels, self.subsets[k])))

    def arrays(self, split: data.Split) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)``: the split normalized as the training loader normalizes it, in one batch."""
        batch = next(iter(data.Loader(split.images, split.labels, batch_size=len(split), mean=self.mean,
                                      std=self.std, shuffle=False, drop_remainder=False, num_epochs=1)))
        return batch["image"], batch["label"]


def load_data(cfg: MergingExperiment) -> Data:
    train = data.load_split(cfg.dataset, "train", data_dir=cfg.data_dir)
    test = data.load_split(cfg.dataset, "test", data_dir=cfg.data_dir)
    mean, std = data.NORMALIZATION.get(cfg.dataset) or data.channel_stats(train.images)
    held = data.subset_per_class(train.labels, cfg.val_per_class, cfg.data_seed)
    rest = np.setdiff1d(np.arange(len(train)), held)
    return Data(train.subset(rest), train.subset(held), test, mean, std, tuple(tuple(s) for s in cfg.subsets))


# ----- scoring -----


class Scorer:
    """Accuracy of a parameter tree: per subset of the test split (10-way argmax) and overall; and the
    validation split's overall accuracy (the λ search's criterion). One compiled forward for everything."""

    def __init__(self, model: models.Model, dataset: Data):
        self.test_x, self.test_y = dataset.arrays(dataset.test)
        self.val_x, self.val_y = dataset.arrays(dataset.val)
        self.subsets = dataset.subsets
        self._predict = jax.jit(lambda variables, x: jnp.argmax(model.apply(variables, x, train=False).logits, -1))

    def predictions(self, params, x) -> np.ndarray:
        return np.asarray(self._predict({"params": params}, x))

    def test(self, params) -> dict[str, float]:
        return self.test_of_predictions(self.predictions(params, self.test_x))

    def test_of_predictions(self, predicted: np.ndarray) -> dict[str, float]:
        hit = predicted == self.test_y
        out = {f"s{k}": float(hit[np.isin(self.test_y, s)].mean()) for k, s in enumerate(self.subsets)}
        out["all"] = float(hit.mean())
        return out

    def validation(self, params) -> float:
        return float((self.predictions(params, self.val_x) == self.val_y).mean())


# ----- merges -----


class MergeUnavailable(RuntimeError):
    """The merge's function is not in this version of :mod:`jaxkd.merging`."""


def merge_function(method: str) -> Callable:
    fn = getattr(merging, method, None)
    if fn is None:
        raise MergeUnavailable(f"jaxkd.merging has no {method!r}")
    return fn


def call_merge(spec: Mapping[str, Any], base, experts: list, rng: jax.Array):
    """The merge ``spec`` of the experts' parameters (around ``base``), by its function's signature: a
    ``base`` argument gets the base, ``models`` the experts, ``weights`` one 1.0 per expert (linear's are
    normalized to the uniform soup), ``rng`` a key; a two-model merge ``(a, b, t)`` gets ``spec["models"]``."""
    fn = merge_function(spec["method"])
    kwargs = {k: v for k, v in spec.items() if k not in ("method", "scaled", "models")}
    params = inspect.signature(fn).parameters
    chosen = [experts[i] for i in spec.get("models", range(len(experts)))]
    if "a" in params and "b" in params:
        if len(chosen) != 2:
            raise ValueError(f"{spec['method']} merges two models: set 'models': (i, j) in its merges entry")
        return fn(chosen[0], chosen[1], **kwargs)
    if "base" in params:
        kwargs["base"] = base
    if "weights" in params and "weights" not in kwargs:
        kwargs["weights"] = [1.0] * len(chosen)
    if "rng" in params:
        kwargs["rng"] = rng
    return fn(models=chosen, **kwargs)


def scaled(base, merged, scale: float):
    """``base + scale · (merged − base)``, in float32."""
    return jax.tree.map(lambda b, m: (b + scale * (m.astype(jnp.float32) - b)).astype(b.dtype), base, merged)


def describe_merge(spec: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("method", "scaled", "models"))
    models_ = f" of experts {tuple(spec['models'])}" if "models" in spec else ""
    return f"{spec['method']}({args}){models_}" + (" × λ" if spec.get("scaled") else "")


# ----- the experiment -----


def stage_dir(out_dir: str, seed: int, stage: str) -> str:
    return os.path.join(out_dir, "stages", f"seed{seed}", stage)


def run_experiment(cfg: MergingExperiment, out_dir: str) -> dict[str, Any]:
    with jax.default_prng_impl("rbg"):  # as experiments.distill: fast initialization compiles on CPU
        return _run_experiment(cfg, out_dir)


@dataclasses.dataclass
class Context:
    """What every trained stage of a run shares."""

    cfg: MergingExperiment
    dataset: Data
    model: models.Model
    scorer: Scorer
    runner: Runner
    phases: Phases
    out_dir: str
    sample: dict
    abstract: Any
    shared: dict  # the settings every stage's checkpoint records

    def train_stage(self, stage: str, seed: int, split: data.Split, steps: int, lr: float, init=None):
        """The stage's parameters (``model`` trained with cross-entropy on ``split`` from ``init`` or a fresh
        initialization): loaded when finished (with the same settings: another configuration in the same run
        folder is refused, naming what differs), else trained resumably and saved."""
        directory = stage_dir(self.out_dir, seed, stage)
        config = {**self.shared, "init": None if init is None else jaxkd.checkpoint.fingerprint(init)["sha256"],
                  "run": stage, "seed": seed, "steps": steps, "lr": lr, "examples": len(split)}
        if os.path.isdir(directory) and os.path.exists(directory + ".json"):
            with open(directory + ".json") as f:
                differences = jaxkd.checkpoint.config_differences(json.load(f), config)
            if differences:
                raise ValueError(f"stage {stage!r} of seed {seed} in {directory} was trained with another "
                                 f"configuration ({'; '.join(differences)}): use another --out")
            with self.phases.phase("checkpoints"):
                variables = load_variables(directory, self.abstract)
            self.runner.progress.update(steps)
            return variables["params"]
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), stable_hash(stage))
        evaluation = Evaluation(lambda state: {"accuracy": self.scorer.test(state.student.params)["all"]},
                                prefix="test_", progress=("accuracy", ".3f"))
        state = self.fit(stage, seed, self.model, None if init is None else {"params": init}, split, steps, lr,
                         self.sgd(lr, steps), evaluation, config, rng)
        variables = jax.device_get(state.student.variables())
        with self.phases.phase("checkpoints"):
            save_variables(directory, variables)
        write_json(directory + ".json", config)  # last: the stage is finished
        return variables["params"]

    def sgd(self, lr: float, steps: int) -> optax.GradientTransformation:
        """SGD with momentum, (coupled) weight decay and a cosine schedule: every stage's optimizer."""
        return optax.chain(optax.add_decayed_weights(self.cfg.weight_decay),
                           optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=self.cfg.momentum))

    def fit(self, run: str, seed: int, model: models.Model, variables, split: data.Split, steps: int, lr: float,
            tx: optax.GradientTransformation, evaluation: Evaluation, config: dict, rng: jax.Array):
        """``model`` trained with cross-entropy on ``split`` for ``steps`` (resumably, through the runner)."""
        cfg = self.cfg
        with self.phases.phase("setup"):
            state = jaxkd.create(student=model, method=methods.parse("ce"), tx=tx, sample_batch=self.sample, rng=rng,
                                 student_variables=variables)
        loader = data.Loader(split.images, split.labels, batch_size=min(cfg.batch_size, len(split)),
                             mean=self.dataset.mean, std=self.dataset.std, shuffle=True, seed=seed,
                             drop_remainder=True, num_epochs=None, num_classes=self.dataset.train.num_classes)
        config = {**self.shared, "run": run, "seed": seed, "steps": steps, "lr": lr, "examples": len(split), **config}
        state, _ = self.runner.fit(run=run, seed=seed, state=state, loaders={"train": loader}, steps=steps,
                                   lr_schedule=optax.cosine_decay_schedule(lr, steps), config=config,
                                   evaluation=evaluation)
        return state


def _run_experiment(cfg: MergingExperiment, out_dir: str) -> dict[str, Any]:
    started = time.time()
    phases = Phases()
    with phases.phase("data"):
        dataset = load_data(cfg)
    num_classes = dataset.train.num_classes
    model = models.get(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
    sample = {"image": dataset.arrays(dataset.val)[0][:cfg.batch_size],
              "label": dataset.val.labels[:cfg.batch_size]}
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample["image"])
    model_state = {k: v for k, v in abstract.items() if k != "params"}
    if model_state:
        raise ValueError(f"merging needs a model whose variables are its parameters; {cfg.model} also has "
                         f"{sorted(model_state)} (batch statistics do not merge): use a model without them")
    scorer = Scorer(model, dataset)
    multitask_steps = cfg.multitask_steps or cfg.expert_steps * len(cfg.subsets)
    learned_steps = sum(spec.get("steps", 0) for spec in cfg.learned.values() if spec["method"] in LEARNED_TRAINED)
    total_steps = len(cfg.seeds) * (cfg.base_steps + len(cfg.subsets) * cfg.expert_steps + multitask_steps
                                    + learned_steps)
    progress = progress_bar(total_steps)
    per_seed: dict[str, list[dict[str, float]]] = {}
    extras: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    details: dict[str, list[dict]] = {}  # what a learned merge reports besides its scores, per seed
    shared = {"dataset": cfg.dataset, "model": cfg.model, "model_kwargs": dict(cfg.model_kwargs),
              "subsets": [list(s) for s in cfg.subsets], "val_per_class": cfg.val_per_class,
              "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
              "data_seed": cfg.data_seed}

    def record(row: str, scores: dict[str, float], extra: Any = None) -> None:
        per_seed.setdefault(row, []).append(scores)
        if extra is not None:
            extras.setdefault(row, []).append(extra)

    with PreemptionFlag() as preemption:
        runner = Runner(out_dir, progress=progress, preemption=preemption, phases=phases, eval_every=cfg.eval_every,
                        checkpoint_every=cfg.checkpoint_every, tensorboard=cfg.tensorboard)
        ctx = Context(cfg, dataset, model, scorer, runner, phases, out_dir, sample, abstract, shared)
        try:
            for seed in cfg.seeds:
                base = ctx.train_stage("base", seed, dataset.train, cfg.base_steps, cfg.base_lr)
                experts = [ctx.train_stage(f"expert{k}", seed, dataset.of_subset(dataset.train, k), cfg.expert_steps,
                                           cfg.expert_lr, init=base) for k in range(len(cfg.subsets))]
                multitask = ctx.train_stage("multitask", seed, dataset.train, multitask_steps, cfg.expert_lr,
                                            init=base)
                with phases.phase("evaluation"):
                    record("base", scorer.test(base))
                    for k, expert in enumerate(experts):
                        record(f"expert{k}", scorer.test(expert))
                    record("multitask", scorer.test(multitask))
                # What every merge's cached result depends on besides its own spec.
                sources = {"models": jaxkd.checkpoint.fingerprint([base, *experts])["sha256"],
                           "scale_grid": list(cfg.scale_grid), **shared}
                for row, spec in cfg.merges.items():
                    with phases.phase("evaluation"):  # merging and scoring: nothing trains
                        result = cached_merge(out_dir, seed, row, {"spec": spec, **sources}, lambda: score_merge(
                            cfg, spec, base, experts, scorer, jax.random.fold_in(jax.random.key(seed), 7)))
                    if "unavailable" in result:
                        skipped[row] = result["unavailable"]
                        continue
                    record(row, result["scores"], result.get("scale"))
                for row, settings in cfg.learned.items():
                    settings, learn = dict(settings), LEARNED[settings["method"]]
                    fresh = []
                    learn_settings = {k: v for k, v in settings.items() if k != "method"}
                    result = cached_merge(out_dir, seed, row, {"spec": settings, **sources}, lambda: (
                        fresh.append(True) or learn(ctx, row, learn_settings, base, experts, seed)))
                    if not fresh and settings["method"] in LEARNED_TRAINED:  # its steps were not run here
                        progress.update(settings.get("steps", 0))
                    if "unavailable" in result:
                        skipped[row] = result["unavailable"]
                        continue
                    record(row, result["scores"])
                    details.setdefault(row, []).append(
                        {k: v for k, v in result.items() if k not in ("scores", "key")})
                jax.clear_caches()
        finally:
            runner.close()
            progress.close()

    summary = summarize(cfg, dataset, per_seed, extras, skipped, seconds=time.time() - started,
                        multitask_steps=multitask_steps)
    for entry in summary["rows"]:
        if entry["run"] in details:
            entry["details_per_seed"] = details[entry["run"]]
    summary["time"] = phases.breakdown()
    report.write(out_dir, summary)
    return summary


def stable_hash(text: str) -> int:
    """A stable small integer of ``text`` (``hash`` of a str changes between processes)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def write_json(path: str, value: Any) -> None:
    """``value`` as JSON at ``path``, atomically; what JSON cannot represent is written as its text."""
    report.write_json(path, value, default=str)


def cached_merge(out_dir: str, seed: int, row: str, key: Mapping[str, Any], compute: Callable[[], dict]) -> dict:
    """The merge's result, read from ``merges/seed<seed>/<row>.json`` when written with the same ``key`` (its
    spec, the merged models' fingerprint, the settings it read), else computed and written. A merge unavailable
    in this version of the library is not cached."""
    path = os.path.join(out_dir, "merges", f"seed{seed}", f"{row}.json")
    key = json.loads(json.dumps(key, default=str))
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    try:
        result = compute()
    except MergeUnavailable as e:
        return {"unavailable": str(e)}
    write_json(path, {**result, "key": key})
    return result


def score_merge(cfg: MergingExperiment, spec: Mapping[str, Any], base, experts: list, scorer: Scorer,
                rng: jax.Array) -> dict[str, Any]:
    """Test scores of one merge; with ``spec["scaled"]``, at the λ of ``scale_grid`` with the best validation
    accuracy (the first of equals: the smallest)."""
    merged = call_merge(spec, base, experts, rng)
    if not spec.get("scaled"):
        return {"scores": scorer.test(merged)}
    accuracy = [scorer.validation(scaled(base, merged, s)) for s in cfg.scale_grid]
    best = cfg.scale_grid[int(np.argmax(accuracy))]
    return {"scores": scorer.test(scaled(base, merged, best)), "scale": float(best),
            "val_accuracy": dict(zip(map(str, cfg.scale_grid), accuracy))}


# ----- learned merges: row name -> fn(ctx, settings, base, experts, seed) -> {"scores": ..., ...} -----


def subset_index(labels: np.ndarray, subsets: tuple) -> np.ndarray:
    """Each label's subset (its expert's index); -1 for a class no subset has."""
    index = np.full(len(labels), -1, np.int32)
    for k, classes in enumerate(subsets):
        index[np.isin(labels, classes)] = k
    return index


def twin_merging(ctx: Context, row: str, settings: dict, base, experts: list, seed: int) -> dict[str, Any]:
    """Twin-Merging: the shared task-arithmetic merge (``scaling``) plus each expert's exclusive knowledge at rank
    ``rank``, merged per test input by a router trained on the validation split's images to predict their subset
    (:mod:`jaxkd.merging.twin_merging`); also reports the router's accuracy at picking the test image's subset."""
    scorer, feature = ctx.scorer, settings.get("feature", "pooled")
    with ctx.phases.phase("evaluation"):
        twin = merging.twin_compress(base, experts, rank=settings["rank"], scaling=settings.get("scaling", 0.3))
        task = subset_index(scorer.val_y, ctx.dataset.subsets)
        keep = task >= 0
        features = merging.twin_router_features(ctx.model, twin, scorer.val_x[keep], feature=feature)
        router = merging.TwinRouter(num_experts=len(experts))
        router_params = merging.train_twin_router(
            router, features, task[keep], rng=jax.random.fold_in(jax.random.PRNGKey(seed), stable_hash(row)),
            steps=settings["steps"], learning_rate=settings["lr"])
        logits = merging.twin_apply(ctx.model, twin, router, router_params, scorer.test_x, feature=feature)
        routed = merging.twin_router_weights(
            router, router_params, merging.twin_router_features(ctx.model, twin, scorer.test_x, feature=feature))
    test_task = subset_index(scorer.test_y, ctx.dataset.subsets)
    routing = float((np.argmax(np.asarray(routed), -1) == test_task)[test_task >= 0].mean())
    return {"scores": scorer.test_of_predictions(np.argmax(np.asarray(logits), -1)), "router_test_accuracy": routing}


def scalearn(ctx: Context, row: str, settings: dict, base, experts: list, seed: int) -> dict[str, Any]:
    """ScaLearn (:func:`jaxkd.merging.scalearn_model`): the frozen experts' ``feature`` representations scaled by
    learned ``ω`` and summed, then a new linear head; ``ω`` and the head trained with cross-entropy (Adam) on the
    target task — all ten classes — from ``labels_per_class`` labeled training images per class."""
    cfg, dataset = ctx.cfg, ctx.dataset
    target = merging.scalearn_model([ctx.model] * len(experts), [{"params": e} for e in experts],
                                    feature=settings.get("feature", "pooled"), num_classes=dataset.train.num_classes,
                                    omega=settings.get("omega", "vector"))
    split = dataset.train.subset(data.subset_per_class(dataset.train.labels, settings["labels_per_class"],
                                                       cfg.data_seed))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), stable_hash(row))
    predict = jax.jit(lambda variables, x: jnp.argmax(target.apply(variables, x, train=False).logits, -1))

    def test(variables) -> dict[str, float]:
        return ctx.scorer.test_of_predictions(np.asarray(predict(variables, ctx.scorer.test_x)))

    evaluation = Evaluation(lambda state: {"accuracy": test(state.student.variables())["all"]}, prefix="test_",
                            progress=("accuracy", ".3f"))
    variables = target.init(rng, ctx.sample["image"])  # outside jit: the experts are not compiled in as constants
    state = ctx.fit(row, seed, target, variables, split, settings["steps"], settings["lr"],
                    optax.adam(optax.cosine_decay_schedule(settings["lr"], settings["steps"])), evaluation,
                    {"settings": settings}, rng)
    return {"scores": test(jax.device_get(state.student.variables())), "examples": len(split)}


def expert_merging(ctx: Context, row: str, settings: dict, base, experts: list, seed: int) -> dict[str, Any]:
    """Expert Merging (:mod:`jaxkd.merging.expert_merging`, :func:`jaxkd.methods.expert_merging`): one coefficient
    per layer and expert (``init`` 0.1, sigmoid parametrization), trained to align the merged model's logits (and
    ``features``) with each expert's on that expert's unlabeled calibration images — ``calibration_per_subset``
    training images of each subset, drawn once (``data_seed``), their labels never read; AdamW with the
    official weight decay 1e-5 and clipping at norm 1, ``lr`` (the official 0.5 by default)."""
    cfg, dataset, scorer = ctx.cfg, ctx.dataset, ctx.scorer
    count = len(experts)
    entries = tuple(f"calibration{k}" for k in range(count))
    names = tuple(f"expert_{k}" for k in range(count))
    pools = []
    for k in range(count):
        subset = dataset.of_subset(dataset.train, k)
        chosen = np.random.default_rng([cfg.data_seed, k]).permutation(len(subset))[:settings["calibration_per_subset"]]
        pools.append(subset.subset(np.sort(chosen)))
    batch = min(settings.get("batch_size", 16), *(len(p) for p in pools))
    loaders = {("train" if k == 0 else entries[k]): data.Loader(
        pool.images, pool.labels, batch_size=batch, mean=dataset.mean, std=dataset.std, shuffle=True,
        seed=seed + 1000 * k, drop_remainder=True, num_epochs=None) for k, pool in enumerate(pools)}

    def combine(batches):  # images only: the labels stay in the loaders
        return {entries[k]: batches["train" if k == 0 else entries[k]]["image"] for k in range(count)}

    participants = merging.expert_merging_participants(ctx.model, base, experts, entries=entries, names=names,
                                                       init=settings.get("init", 0.1))
    method = methods.expert_merging(experts=names, entries=entries, features=tuple(settings.get("features", ())),
                                    reg_weight=settings.get("reg_weight", 5.0))
    steps, lr = settings["steps"], settings["lr"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-5))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), stable_hash(row))
    sample = combine({name: loader.batch((0, 0)) for name, loader in loaders.items()})
    with ctx.phases.phase("setup"):
        state = jaxkd.create(participants=participants, method=method, tx=tx, sample_batch=sample, rng=rng)

    def test(state) -> dict[str, float]:
        return scorer.test(merging.merged_params(state.student.variables()))

    evaluation = Evaluation(lambda state: {"accuracy": test(state)["all"]}, prefix="test_",
                            progress=("accuracy", ".3f"))
    config = {**ctx.shared, "run": row, "seed": seed, "settings": settings,
              "base": jaxkd.checkpoint.fingerprint(base)["sha256"]}
    state, _ = ctx.runner.fit(run=row, seed=seed, state=state, loaders=loaders, steps=steps,
                              lr_schedule=lambda step: np.full(np.shape(step), lr), config=config,
                              evaluation=evaluation,
                              combine=combine)
    variables = jax.device_get(state.student.variables())
    lam = merging.coefficients(variables)
    return {"scores": scorer.test(merging.merged_params(variables)),
            "mean_coefficient_per_expert": [float(np.mean([np.asarray(v)[k] for v in lam.values()]))
                                            for k in range(count)]}


#: The learned merges by method: ``fn(ctx, row, settings, base, experts, seed) -> {"scores": ..., ...}``.
LEARNED: dict[str, Callable[..., dict[str, Any]]] = {
    "expert_merging": expert_merging, "twin_merging": twin_merging, "scalearn": scalearn}
#: The learned merges trained through the runner, as run ``<row>`` (their steps count on the progress bar).
LEARNED_TRAINED = ("expert_merging", "scalearn")


# ----- the table -----


def summarize(cfg: MergingExperiment, dataset: Data, per_seed: dict, extras: dict, skipped: dict, *,
              seconds: float, multitask_steps: int) -> dict[str, Any]:
    names = [f"{{{','.join(map(str, s))}}}" for s in cfg.subsets]
    keys = [f"s{k}" for k in range(len(cfg.subsets))] + ["all"]
    header = ["run", "method", *(f"{n} (%)" for n in names), "all (%)", "λ (val)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    descriptions = {"base": f"ce, {cfg.base_steps} steps on all classes",
                    "multitask": f"base + ce, {multitask_steps} steps on every subset jointly",
                    **{f"expert{k}": f"base + ce, {cfg.expert_steps} steps on {n}" for k, n in enumerate(names)},
                    **{row: describe_merge(spec) for row, spec in cfg.merges.items()},
                    **{row: describe_merge(spec) for row, spec in cfg.learned.items()}}
    for row, scores in per_seed.items():
        entry = {"run": row, "method": descriptions.get(row, row), "seeds": len(scores)}
        cells = [row, f"`{entry['method']}`"]
        for key in keys:
            values = [100.0 * s[key] for s in scores]
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            entry.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_per_seed": values})
            cells.append(f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}")
        scale = extras.get(row)
        entry["scale_per_seed"] = scale
        cells.append("" if not scale else ", ".join(f"{s:g}" for s in scale))
        rows.append(entry)
        lines.append("| " + " | ".join(cells) + " |")
    subset_sizes = ", ".join(f"{n}: {int(np.isin(dataset.test.labels, s).sum())}" for n, s in
                             zip(names, cfg.subsets))
    caption = (f"{cfg.dataset}: {cfg.model} {dict(cfg.model_kwargs)}; base trained {cfg.base_steps} steps on "
               f"{len(dataset.train)} training images (all classes), experts fine-tuned from it {cfg.expert_steps} "
               f"steps each on their subset's images (10-way head kept). Test accuracy (%, 10-way argmax) on each "
               f"subset's test images ({subset_sizes}) and on all {len(dataset.test)}, mean ± std over seeds "
               f"{tuple(cfg.seeds)}. λ: the scaling of `× λ` merges, chosen per seed on the validation split "
               f"({len(dataset.val)} held-out training images) from {tuple(cfg.scale_grid)}. Wall time "
               f"{seconds / 60:.1f} min.")
    notes = {"expert_merging": "{row}: coefficients fitted on unlabeled calibration images of each subset's "
                               "training split (labels unused)",
             "twin_merging": "{row}: router trained on the validation split (each image labeled with its subset), "
                             "shared model = task arithmetic at the given scaling",
             "scalearn": "{row}: ω and head trained on {labels} labeled training images per class (target task: "
                         "all ten classes)"}
    for row, spec in cfg.learned.items():
        if row in per_seed:
            caption += " " + notes[spec["method"]].format(row=row, labels=spec.get("labels_per_class")) + "."
    if any("models" in spec for spec in cfg.merges.values()):
        caption += " Two-model merges (`of experts (i, j)`) merge only those experts."
    if skipped:
        caption += " Not run (not in this version of jaxkd.merging): " + "; ".join(
            f"{row} ({why})" for row, why in skipped.items()) + "."
    return {"rows": rows, "table": "\n".join(lines) + "\n\n" + caption, "seconds": seconds, "skipped": skipped,
            "config": dataclasses.asdict(cfg)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_command(argv, run_experiment, description=__doc__, config_type=MergingExperiment,
                       default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    # The importable module's classes, not __main__'s copies: config files import them from there.
    from experiments import merging as merging_experiment

    entry_point(merging_experiment.main)
