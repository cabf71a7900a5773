"""The Hugging Face recipe (experiments/hf_distill.py) end to end on tiny random checkpoints: a qwen2 teacher and
student whose embeddings are padded differently past their shared tokenizer (cut to it, no flag), chat JSONL,
a few steps; the exported student loads in transformers with jaxkd's logits; a run killed (SIGKILL) and
re-run ends with the uninterrupted run's parameters and export, bitwise (a student made of teacher blocks,
one example per row)."""

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from jaxkd.checkpoint import Checkpointer  # noqa: E402
from jaxkd.models import from_hf  # noqa: E402
from tests.test_hf_tokenizer import CHAT_TEMPLATE, byte_level_bpe  # noqa: E402
from tests.test_resume import ROOT, wait_for  # noqa: E402

TOKENS = 300  # the tokenizer's vocabulary (byte_level_bpe)
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=True)
QUESTIONS = ["What is distillation?", "Name a prime.", "Say hello.", "Add two and two.", "Spell jax.",
             "Why tiny models?", "Is the sky blue?", "Count to three.", "What is a teacher?", "Pick a colour."]


def _checkpoint(path, layers, vocab, seed):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(num_hidden_layers=layers, vocab_size=vocab, **SMALL)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher (3 layers, 320 embedding rows) with the tokenizer in its directory, a student (1 layer, 336
    rows), train and eval JSONL."""
    root = tmp_path_factory.mktemp("hf_recipe")
    teacher = _checkpoint(root / "teacher", 3, 320, 0)
    byte_level_bpe().save(str(teacher / "tokenizer.json"))
    (teacher / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    _checkpoint(root / "student", 1, 336, 1)
    for name, n in (("train", 20), ("eval", 6)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                q = QUESTIONS[i % len(QUESTIONS)]
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{q} ({name} {i})"},
                                                 {"role": "assistant", "content": f"Answer {i}: {q[::-1]}"}]}) + "\n")
    return root


def settings(root, **extra):
    values = {"teacher": str(root / "teacher"), "student": str(root / "student"), "train_data": str(root / "train.jsonl"),
              "eval_data": str(root / "eval.jsonl"), "seq_len": 48, "pack": True, "steps": 6, "lr": 1e-2,
              "warmup_steps": 1, "batch_size": 4, "microbatches": 2, "eval_every": 3, "checkpoint_every": 2,
              "tensorboard": False, "compilation_cache": None, **extra}
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value!r}" if not isinstance(value, str) else f"{key}={value}"]
    return args


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_distills_and_exports_a_student_transformers_loads(setup, tmp_path):
    from experiments import hf_distill

    out = tmp_path / "run"
    summary = hf_distill.main(settings(setup) + ["--out", str(out)])
    assert summary["vocab_size"] == TOKENS
    # metrics.jsonl: every step's training loss once, held-out loss and bits per byte at 0, 3, 6.
    rs = records(out)
    assert sorted(r["step"] for r in rs if "loss" in r) == list(range(1, 7))
    evals = {r["step"]: r for r in rs if "val_loss" in r}
    assert sorted(evals) == [0, 3, 6] and all(np.isfinite(r["val_bpb"]) for r in evals.values())
    assert evals[6]["val_loss"] < evals[0]["val_loss"]  # it learned something (lr 1e-2 on tiny models)

    # The export: transformers loads it; its logits over the tokenizer's vocabulary are jaxkd's final student's.
    model, variables = summary["final_student"]
    assert model.vocab_size == TOKENS
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "student_hf").eval()
    assert hf.config.vocab_size == 336  # every embedding row written back
    assert os.path.isfile(out / "student_hf" / "tokenizer.json")
    ids = np.random.default_rng(0).integers(0, TOKENS, (2, 12))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model.apply(variables, {"tokens": ids, "mask": np.ones_like(ids, bool)}, train=False).logits)
    assert got.shape == (2, 12, TOKENS)
    np.testing.assert_allclose(got, expected[..., :TOKENS], atol=1e-4, rtol=1e-4)
    # The trained student is not the checkpoint it started from.
    start = transformers.AutoModelForCausalLM.from_pretrained(setup / "student").eval()
    with torch.no_grad():
        assert not np.allclose(start(torch.tensor(ids)).logits.numpy(), expected, atol=1e-3)


def test_vocabularies_that_almost_match(setup, tmp_path):
    """from_hf(vocab_size=...) cuts a padded embedding's logits to the tokenizer's; a tokenizer larger than the
    embedding is refused, naming both sizes; so is a recipe run whose tokenizer exceeds the student's."""
    full, variables = from_hf(setup / "teacher")
    cut, cut_variables = from_hf(setup / "teacher", vocab_size=TOKENS)
    assert full.vocab_size is None and cut.vocab_size == TOKENS
    ids = {"tokens": np.arange(10)[None], "mask": np.ones((1, 10), bool)}
    np.testing.assert_array_equal(cut.apply(cut_variables, ids, train=False).logits,
                                  full.apply(variables, ids, train=False).logits[..., :TOKENS])
    with pytest.raises(ValueError, match=r"vocabulary \(321 tokens\) is larger than the model's embedding \(320 rows\)"):
        from_hf(setup / "teacher", vocab_size=321)

    small = _checkpoint(tmp_path / "small", 1, 256, 2)
    from experiments import hf_distill

    with pytest.raises(ValueError, match=r"300 tokens\) is larger than the model's embedding \(256 rows\)"):
        hf_distill.main(settings(setup, student=str(small)) + ["--out", str(tmp_path / "bad")])


def command(setup, out):
    # One compilation cache for the test's three processes (the first compiles, the others load).
    return [sys.executable, "-m", "experiments.hf_distill", "--out", str(out),
            *settings(setup, student="init_from_teacher", student_layers=2, pack=False, steps=24,
                      checkpoint_every=4, eval_every=24, compilation_cache=str(out.parent / "xla_cache"))]


def final_state(out):
    """The checksum of every array of the run's last checkpoint and the exported safetensors' bytes."""
    (run_dir,) = glob.glob(os.path.join(out, "checkpoints", "seed*", "*"))
    with Checkpointer(run_dir, read_only=True) as ckpt:
        manifest = ckpt.manifest(ckpt.latest_step())
    with open(os.path.join(out, "student_hf", "model.safetensors"), "rb") as f:
        exported = f.read()
    return [(leaf["path"], leaf["sha256"]) for leaf in manifest["leaves"]], exported


def test_killed_run_resumes_bitwise(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    reference = subprocess.run(command(setup, tmp_path / "reference"), cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    proc = subprocess.Popen(command(setup, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(out, lambda rs: any(r.get("step", 0) >= 8 and "loss" in r for r in rs), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / "student_hf")  # killed mid-run
    done = subprocess.run(command(setup, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert final_state(out) == final_state(tmp_path / "reference")
    assert sorted(map(json.dumps, records(out))) == sorted(map(json.dumps, records(tmp_path / "reference")))


def test_command_errors_are_one_line(setup, tmp_path, capsys):
    from experiments import hf_distill
    from experiments.runner import entry_point

    for override, message in ((f"teacher={tmp_path / 'nowhere'}", "teacher: no checkpoint directory"),
                              (f"train_data={tmp_path / 'none.jsonl'}", "train_data: no file"),
                              ("method=lm_ce + nope()", "config method: unknown method 'nope'"),
                              ("microbatches=3", "microbatches must divide batch_size")):
        with pytest.raises(SystemExit) as e:
            entry_point(hf_distill.main, settings(setup) + ["--set", override, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_the_recipe_on_a_mesh_equals_one_device(setup, tmp_path):
    """The same run on a (data 2, fsdp 2, tensor 2) mesh of the 8 simulated devices: the student's state and the
    teacher sharded by the LM rules, batches split four ways; its losses and exported weights equal the
    one-device run's up to float32 reduction order."""
    from experiments import hf_distill

    common = dict(steps=2, eval_every=2, checkpoint_every=0, batch_size=8, microbatches=2)
    single = hf_distill.main(settings(setup, **common) + ["--out", str(tmp_path / "one")])
    meshed = hf_distill.main(settings(setup, **common, mesh={"data": 2, "fsdp": 2, "tensor": 2})
                             + ["--out", str(tmp_path / "mesh")])
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "mesh"), strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "val_loss", "val_bpb"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5)
    np.testing.assert_allclose(meshed["student"]["loss"], single["student"]["loss"], rtol=2e-5)
    assert single["devices"] == 1 and meshed["devices"] == 8
    with pytest.raises(ValueError, match=r"batch_size / microbatches = 2 rows .* not divisible by data x fsdp"):
        hf_distill.main(settings(setup, **{**common, "microbatches": 4}, mesh={"data": 2, "fsdp": 2, "tensor": 2})
                        + ["--out", str(tmp_path / "bad")])


def test_a_bfloat16_student_keeps_float32_parameters_and_logits(setup):
    # precision="bfloat16": the mixed policy on the student (float32 parameters, bfloat16 compute, float32
    # logits close to the float32 model's), the teacher as dtype says; bad names refused by the config.
    import jax
    import jax.numpy as jnp

    from experiments import hf_distill
    from experiments.config import validate

    cfg = hf_distill.HFDistillExperiment(teacher=str(setup / "teacher"), student=str(setup / "student"),
                                         precision="bfloat16")
    teacher, _, student, student_vars = hf_distill.load_models(cfg, TOKENS)
    f32 = hf_distill.load_models(hf_distill.HFDistillExperiment(teacher=cfg.teacher, student=cfg.student), TOKENS)
    assert student.module.config.dtype == jnp.bfloat16 and student.module.config.param_dtype == jnp.float32
    assert teacher.module.config.dtype == jnp.float32 and student.vocab_size == TOKENS
    assert {leaf.dtype for leaf in jax.tree.leaves(student_vars)} == {jnp.dtype(jnp.float32)}
    ids = np.random.default_rng(1).integers(0, TOKENS, (2, 12))
    x = {"tokens": ids, "mask": np.ones_like(ids, bool)}
    got = student.apply(student_vars, x, train=False).logits
    want = f32[2].apply(f32[3], x, train=False).logits
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.05)  # bf16 activations: ~3 significant digits
    assert not np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="no loss scaling"):
        validate(hf_distill.HFDistillExperiment(precision="float16"))
