"""Cached frozen teachers (jaxkd.data.images.teacher_cache): the fixed-view cache gives the live teacher's KD
step, FKD's replay reproduces the stored crop and the teacher's top-k on it, marginal smoothing matches the
official code, caches of other settings are refused naming the difference, and reading resumes exactly."""

import dataclasses
import os
import pickle

import jax
import numpy as np
import optax
import pytest
import torch

import jaxkd
from jaxkd import methods, models
from jaxkd.data.images import teacher_cache as tc

NUM_CLASSES = 5
MEAN, STD = (0.3,), (0.25,)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=20).astype(np.int32)
    return images, labels


@pytest.fixture(scope="module")
def teacher(data):
    model = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(32,))
    variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 4, 4, 1), np.float32))
    return model, variables


FKD = dict(kind="fkd", mean=MEAN, std=STD, augment="crop_flip", pad=2, num_views=3, k=2, seed=7, batch_size=8)


@pytest.fixture(scope="module")
def fkd_cache(tmp_path_factory, data, teacher):
    return tc.write_teacher_cache(tmp_path_factory.mktemp("fkd") / "cache", *teacher, data[0], **FKD)


@pytest.fixture(scope="module")
def fixed_cache(tmp_path_factory, data, teacher):
    return tc.write_teacher_cache(tmp_path_factory.mktemp("fixed") / "cache", *teacher, data[0], kind="fixed",
                                  mean=MEAN, std=STD, batch_size=8)


def loader(data, cache, **kwargs):
    return tc.CachedTeacherLoader(*data, cache=cache, batch_size=8, mean=MEAN, std=STD, seed=3, num_epochs=None,
                                  **kwargs)


def test_fixed_cache_kd_step_equals_the_live_teacher_step(data, teacher, fixed_cache):
    model, variables = teacher
    batch = next(loader(data, fixed_cache))
    student = models.get("mlp", num_classes=NUM_CLASSES, hidden_sizes=(16,))
    student_vars = student.init(jax.random.PRNGKey(2), batch["image"])
    method = methods.parse("ce + kd(temperature=4)")
    common = dict(student=student, method=method, tx=optax.sgd(0.1), sample_batch=batch,
                  rng=jax.random.PRNGKey(0), student_variables=student_vars)
    live = jaxkd.create(teacher=model, teacher_variables=variables, **common)
    cached = jaxkd.create(participants={"teacher": tc.cached_teacher(fixed_cache)}, **common)
    step = jaxkd.make_train_step()
    live, live_metrics = step(live, batch)
    cached, cached_metrics = step(cached, batch)
    # The cached logits are the teacher's on the batch's (normalized) images; KD terms and updates agree.
    np.testing.assert_allclose(batch[tc.LOGITS], model.apply(variables, batch["image"], train=False).logits,
                               rtol=1e-5, atol=1e-6)
    assert float(live_metrics["kd"]) > 1e-3
    np.testing.assert_allclose(float(cached_metrics["kd"]), float(live_metrics["kd"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 cached.student.params, live.student.params)


def crop(image, pad, dy, dx, flip):
    """The reference crop: zero-pad by ``pad``, take the HxW window at (dy, dx), flip the columns."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    out = padded[dy:dy + h, dx:dx + w]
    return out[:, ::-1] if flip else out


def test_fkd_replay_is_the_stored_crop_and_its_topk_is_the_teachers(data, teacher, fkd_cache):
    model, variables = teacher
    images = data[0]
    batches = loader(data, fkd_cache, with_index=True)
    seen_views = set()
    for epoch_step in range(5):  # 2.5 epochs of 2 batches: views differ between epochs
        epoch = epoch_step // 2
        batch = next(batches)
        idx = batch["index"]
        views = np.random.default_rng([3, 2, epoch]).integers(0, 3, size=20)[idx]  # the documented draw
        seen_views.update(zip(idx.tolist(), views.tolist()))
        arrays = fkd_cache.arrays
        expected = np.stack([crop(images[i], 2, arrays["dy"][i, v], arrays["dx"][i, v], arrays["flip"][i, v])
                             for i, v in zip(idx, views)])
        # The batch's pixels, un-normalized, are exactly the stored crop.
        pixels = np.rint((batch["image"] * STD[0] + MEAN[0]) * 255).astype(np.int64)
        np.testing.assert_array_equal(pixels, expected)
        # And the cached top-k is the teacher's on that crop.
        probs = np.asarray(jax.nn.softmax(model.apply(variables, batch["image"], train=False).logits))
        top = np.argsort(-probs, axis=-1)[:, :2]
        np.testing.assert_array_equal(batch[tc.TOPK_CLASSES], top)
        np.testing.assert_allclose(batch[tc.TOPK_PROBS], np.take_along_axis(probs, top, -1), rtol=1e-5)
    # The stored views are real augmentations (not all the identity) and more than one is replayed.
    assert np.any(arrays["dy"] != 2) and np.any(arrays["flip"]) and not np.all(arrays["flip"])
    assert len({v for _, v in seen_views}) == 3


def test_marginal_smoothing_matches_the_official_recover_soft_label(fkd_cache, data):
    batch = next(loader(data, fkd_cache))
    participant = tc.cached_teacher(fkd_cache)
    logits = participant.model.apply(participant.variables, participant.model_input(batch), train=False).logits
    # FKD, utils_FKD.py (szq0214/FKD @ 649f92d1), Recover_soft_label 'marginal_smoothing_k5' with k=2:
    index = torch.tensor(batch[tc.TOPK_CLASSES], dtype=torch.int64)
    value = torch.tensor(batch[tc.TOPK_PROBS])
    minor = (torch.ones(index.size(0), 1) - torch.sum(value, dim=1, keepdim=True)) / (NUM_CLASSES - 2)
    minor = minor.reshape(-1, 1).repeat_interleave(NUM_CLASSES, dim=1)
    soft_label = (minor * torch.ones(index.size(0), NUM_CLASSES)).scatter_(1, index, value)
    np.testing.assert_allclose(np.exp(np.asarray(logits)), soft_label.numpy(), rtol=1e-6, atol=1e-7)


def test_a_cache_of_another_teacher_augmentation_or_size_is_refused_naming_the_difference(
        tmp_path, data, teacher):
    model, variables = teacher
    path = tmp_path / "cache"
    tc.load_or_write_teacher_cache(path, model, variables, data[0], **FKD)
    assert tc.load_or_write_teacher_cache(path, model, variables, data[0], **FKD).kind == "fkd"  # same: reused
    other_teacher = model.init(jax.random.PRNGKey(9), np.zeros((1, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"another teacher \("):
        tc.load_or_write_teacher_cache(path, model, other_teacher, data[0], **FKD)
    with pytest.raises(ValueError, match=r"another augment, pad \(augment: cache has \"crop_flip\", expected "
                                         r"\"shift\"; pad: cache has 2, expected 1\)"):
        tc.load_or_write_teacher_cache(path, model, variables, data[0], **{**FKD, "augment": "shift", "pad": 1})
    with pytest.raises(ValueError, match=r"another num_views \(num_views: cache has 3, expected 4\)"):
        tc.load_or_write_teacher_cache(path, model, variables, data[0], **{**FKD, "num_views": 4})
    with pytest.raises(ValueError, match=r"another k \(k: cache has 2, expected 3\)"):
        tc.load_or_write_teacher_cache(path, model, variables, data[0], **{**FKD, "k": 3})
    with pytest.raises(ValueError, match="another images_sha256"):
        tc.load_or_write_teacher_cache(path, model, variables, 255 - data[0], **FKD)
    with pytest.raises(ValueError, match="another kind"):
        tc.load_or_write_teacher_cache(path, model, variables, data[0], kind="fixed", mean=MEAN, std=STD)


def test_bad_settings_are_refused(tmp_path, data, teacher, fixed_cache):
    model, variables = teacher
    write = lambda **kw: tc.write_teacher_cache(tmp_path / "c", model, variables, data[0], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="augment='none'"):
        write(kind="fixed", augment="shift")
    with pytest.raises(ValueError, match="augment must be 'shift' or 'crop_flip'"):
        write(kind="fkd", k=2)
    with pytest.raises(ValueError, match="needs k"):
        write(kind="fkd", augment="shift")
    with pytest.raises(ValueError, match="k=6 is larger than the teacher's 5 classes"):
        write(kind="fkd", augment="shift", k=6)
    with pytest.raises(ValueError, match="num_views"):
        write(kind="fkd", augment="shift", k=2, num_views=0)
    with pytest.raises(ValueError, match="kind"):
        write(kind="dense")
    with pytest.raises(ValueError, match="uint8"):
        tc.write_teacher_cache(tmp_path / "c", model, variables, data[0].astype(np.float32), kind="fixed")
    with pytest.raises(ValueError, match="N >= 1"):
        tc.write_teacher_cache(tmp_path / "c", model, variables, data[0][:0], kind="fixed")
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        tc.TeacherCache(tmp_path / "missing")
    with pytest.raises(ValueError, match="not those"):
        tc.CachedTeacherLoader(data[0][:10], data[1][:10], cache=fixed_cache, batch_size=4)
    with pytest.raises(ValueError, match="augmentation from the cache"):
        loader(data, fixed_cache, augment="shift")
    with pytest.raises(ValueError, match="drop_remainder"):
        loader(data, fixed_cache, drop_remainder=False)


def test_a_resumed_loader_replays_the_same_views_and_soft_labels(data, fkd_cache):
    straight = loader(data, fkd_cache)
    expected = [next(straight) for _ in range(7)]  # 3.5 epochs
    first = loader(data, fkd_cache)
    for _ in range(3):
        next(first)
    state = first.get_state()
    # A new process: the cache reopened from its path (pickled as the path), the loader restored.
    resumed = loader(data, pickle.loads(pickle.dumps(fkd_cache)))
    resumed.set_state(state)
    for want in expected[3:]:
        got = next(resumed)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


# The whole experiment twice (a teacher and a student trained, ~30 s on 2 busy cores): slow. The fast tests above
# cover its pieces: the cached step equals the live one, the loader's replay and its exact resume, the refusals.
@pytest.mark.slow
def test_an_experiment_reading_a_cache_resumes_to_the_uninterrupted_result(tmp_path):
    import shutil

    from experiments import config as config_lib
    from experiments import distill
    from jaxkd.checkpoint import Checkpointer

    cfg = config_lib.Config(
        teacher="mlp", teacher_kwargs={"hidden_sizes": (32,)}, student="mlp", student_kwargs={"hidden_sizes": (8,)},
        teacher_steps=10, steps=6, eval_every=3, checkpoint_every=3, seeds=(0,), batch_size=16, eval_batch_size=250,
        methods={"fkd": "ce + kd(temperature=1)"}, tensorboard=False, compilation_cache=None, augment="shift",
        teacher_cache="fkd", teacher_cache_views=2, teacher_cache_k=3)

    def run(out):
        os.makedirs(out, exist_ok=True)
        return distill.run_experiment(cfg, str(out))

    def final_params(out):
        with Checkpointer(out / "checkpoints" / "seed0" / "fkd", read_only=True) as ckpt:
            manifest = ckpt.manifest(ckpt.latest_step())
        return [(leaf["path"], leaf["sha256"]) for leaf in manifest["leaves"]]

    reference = run(tmp_path / "reference")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", resumed)
    run_dir = resumed / "checkpoints" / "seed0" / "fkd"
    with Checkpointer(run_dir, read_only=True) as ckpt:
        assert ckpt.steps() == [3, 6]
    shutil.rmtree(run_dir / "6")  # as if killed after the step-3 checkpoint: the run resumes from there
    os.remove(resumed / "results.json")
    again = run(resumed)
    assert [r["top1_per_seed"] for r in again["rows"]] == [r["top1_per_seed"] for r in reference["rows"]]
    assert final_params(resumed) == final_params(tmp_path / "reference")
    # The same folder with another k: the cache on disk is refused, naming the difference.
    cfg = dataclasses.replace(cfg, teacher_cache_k=4)
    with pytest.raises(ValueError, match=r"another k \(k: cache has 3, expected 4\)"):
        run(resumed)


def test_the_experiment_refuses_a_teacher_cache_its_augmentation_or_methods_cannot_use(tmp_path):
    from experiments import config as config_lib
    from experiments import distill

    base = config_lib.Config(methods={"kd": "ce + kd(temperature=4)"}, seeds=(0,))
    bad = {
        "teacher_cache='fixed' caches the teacher's logits of un-augmented images, but augment='shift'":
            dict(teacher_cache="fixed", augment="shift"),
        "teacher_cache='fkd' stores random augmented views, but augment='none'": dict(teacher_cache="fkd", augment="none"),
        r"methods\['mt'\] cannot use it: it also reads the frozen teachers \['wrn'\]": dict(
            teacher_cache="fkd", teachers={"wrn": {"model": "resnet8"}},
            methods={"mt": "ce + multi_teacher_kd(teachers=('teacher', 'wrn'))"}),
    }
    for message, changes in bad.items():
        with pytest.raises(ValueError, match=message):
            distill.run_experiment(dataclasses.replace(base, **changes), str(tmp_path))
    with pytest.raises(ValueError, match="teacher_cache must be one of"):
        config_lib.validate(dataclasses.replace(base, teacher_cache="dense"))
    with pytest.raises(ValueError, match="teacher_cache_k"):
        config_lib.validate(dataclasses.replace(base, teacher_cache_k=0))
