"""jaxkd.lm_eval_adapter: a jaxkd model scored by lm-eval answers as lm-eval's own HFLM does on the same
checkpoint (a tiny random transformers llama with a byte-level BPE tokenizer.json that adds BOS, built here):
the same log-likelihoods and greedy flags, rolling log-likelihoods, generate_until strings, and the same
accuracy, perplexities and per-sample answers from ``lm_eval.simple_evaluate`` on local task YAMLs run offline."""

import json
import os

import numpy as np
import pytest

# Nothing may download: transformers, datasets and lm-eval read these when they are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from jaxkd.data import ByteTokenizer  # noqa: E402
from jaxkd.models.lm import LMConfig, lm  # noqa: E402

# lm-eval's model, task and dataset modules (3 s) and the adapter, which imports them, are imported by the tests
# that use them, not when every pytest worker collects this file.

TOL = 1e-4
MAX_LENGTH = 16
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.",
         "Distillation moves knowledge from a teacher to a student.", "Students learn from teachers."] * 4


def _write_checkpoint(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # as Llama 3
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms (their init is ones)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(checkpoint dir, JaxkdLM, lm-eval's HFLM) on the same checkpoint, both with max_length=16."""
    from lm_eval.models.huggingface import HFLM

    from jaxkd.lm_eval_adapter import JaxkdLM

    path = tmp_path_factory.mktemp("lm_eval_ckpt")
    _write_checkpoint(path)
    ours = JaxkdLM.from_pretrained(path, batch_size=4, max_length=MAX_LENGTH)
    reference = HFLM(pretrained=str(path), batch_size=4, max_length=MAX_LENGTH, device="cpu", dtype="float32")
    return path, ours, reference


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _greedy_pairs(reference):
    """(context, continuation) pairs whose continuation is the transformers model's argmax token after the
    context and tokenizes back to it, so that lm-eval's is_greedy is True for them."""
    pairs = []
    for text in TEXTS[:4]:
        words = text.split(" ")
        for cut in range(1, len(words)):
            context = " ".join(words[:cut])
            ids = reference.tok_encode(context)
            with torch.no_grad():
                best = int(reference.model(torch.tensor([ids])).logits[0, -1].argmax())
            continuation = reference.tok_decode([best])
            if continuation.isprintable() and reference.tok_encode(context + continuation) == ids + [best]:
                pairs.append((context, continuation))
    return pairs[:2]


def test_loglikelihood_equals_hflm(models):
    _, ours, reference = models
    greedy = _greedy_pairs(reference)
    pairs = [("The cat", " sat on the mat."), ("The cat ", "sat on the mat."),  # trailing space moves over
             ("", "A dog"), ("", "<s>A dog"),                                   # empty context: BOS, or itself
             ("<s>The cat", " on the mat."),                                    # no second BOS
             ("Distillation moves knowledge from a teacher", " to a student."),
             ("Students learn from teachers. " * 3, "The cat sat on the mat."),  # truncated left
             *greedy]
    # No two requests share context + continuation[:-1] while one has a one-token continuation: HFLM's logits
    # cache then scores that one at the other's first continuation position (EleutherAI/lm-evaluation-harness
    # #2984, #2987); JaxkdLM scores every request from its own positions.
    requests = _requests("loglikelihood", pairs)
    expected = reference.loglikelihood(requests)
    got = ours.loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], atol=TOL, rtol=0)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert any(e[1] for e in expected) and not all(e[1] for e in expected)


def test_loglikelihood_rolling_equals_hflm(models):
    _, ours, reference = models
    texts = [" ".join(TEXTS[:4]), "The cat.", TEXTS[2] * 2]  # several windows of 16 tokens, and one
    requests = _requests("loglikelihood_rolling", [(t,) for t in texts])
    assert len(ours.tok_encode(texts[0])) > 2 * MAX_LENGTH
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), reference.loglikelihood_rolling(requests),
                               atol=TOL, rtol=0)


def test_generate_until_equals_hflm(models):
    _, ours, reference = models
    args = [("The cat", {"until": ["."], "max_gen_toks": 6}), ("A dog ran in the", {"until": ["."], "max_gen_toks": 6}),
            ("Students learn from teachers. " * 3, {"until": ["."], "max_gen_toks": 6}),  # context left-truncated
            ("The cat", {"until": ["e", "a"], "max_gen_toks": 6, "do_sample": False}),
            ("Distillation", {"max_gen_toks": 6}), ("", {"max_gen_toks": 6})]  # one compiled program: 6 new tokens
    requests = _requests("generate_until", args)
    expected = reference.generate_until(requests)
    assert ours.generate_until(requests) == expected
    assert any(expected)
    with pytest.raises(ValueError, match="greedily"):
        ours.generate_until(_requests("generate_until", [("The cat", {"do_sample": True, "temperature": 0.7})]))


def _write_tasks(directory):
    mc = [{"question": "The cat sat on the", "choices": ["mat.", "park.", "teacher."], "answer": 0},
          {"question": "A dog ran in the", "choices": ["mat.", "park."], "answer": 1},
          {"question": "Distillation moves knowledge from a", "choices": ["teacher", "student", "cat"], "answer": 0},
          {"question": "Students learn from", "choices": ["teachers.", "dogs."], "answer": 0}]
    text = [{"text": " ".join(TEXTS[:4])}, {"text": "A dog ran. The cat sat."}, {"text": TEXTS[2]}]
    for name, rows in (("mc", mc), ("text", text)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: {"data_files": {"test": str(directory / f"{name}.jsonl")},  # noqa: E731
                         "cache_dir": str(directory / "hf_datasets")}
    tasks = {
        "jaxkd_tiny_mc": dict(dataset_path="json", dataset_kwargs=data("mc"), test_split="test",
                              output_type="multiple_choice", doc_to_text="{{question}}",
                              doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
                              metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        "jaxkd_tiny_ppl": dict(dataset_path="json", dataset_kwargs=data("text"), test_split="test",
                               output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                               metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                            {"metric": "bits_per_byte"}]),
    }
    for name, task in tasks.items():  # YAML is a superset of JSON
        (directory / f"{name}.yaml").write_text(json.dumps({"task": name, **task}))
    return sorted(tasks)


def test_simple_evaluate_on_local_tasks_equals_hflm(models, tmp_path):
    from lm_eval.tasks import TaskManager

    _, ours, reference = models
    names = _write_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # lm-eval's own 10k tasks: 14 s
    run = lambda model: lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager,  # noqa: E731
                                                bootstrap_iters=0, log_samples=True)
    got, expected = run(ours), run(reference)
    for name in names:
        metrics = {k: v for k, v in expected["results"][name].items() if "," in k and "stderr" not in k}
        assert len(metrics) == (2 if name.endswith("mc") else 3)
        for metric, value in metrics.items():
            assert got["results"][name][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)
        for a, b in zip(got["samples"][name], expected["samples"][name], strict=True):
            np.testing.assert_allclose(np.asarray(a["resps"], float), np.asarray(b["resps"], float), atol=TOL)
    assert 0.0 <= got["results"]["jaxkd_tiny_mc"]["acc,none"] <= 1.0
    assert got["results"]["jaxkd_tiny_ppl"]["word_perplexity,none"] > 1.0


def test_registered_name_and_argument_string_load_the_checkpoint(models):
    """``--model jaxkd --model_args pretrained=DIR,...`` (lm-eval's command line): the registry gives JaxkdLM, the
    argument string and lm-eval's ``batch_size`` configure it, generation stops at the checkpoint's EOS."""
    from lm_eval.api.registry import get_model

    from jaxkd.lm_eval_adapter import JaxkdLM

    path, ours, _ = models
    assert get_model("jaxkd") is JaxkdLM
    loaded = JaxkdLM.create_from_arg_string(f"pretrained={path},max_length=12,max_gen_toks=5", {"batch_size": 3})
    assert (loaded.batch_size, loaded.max_length, loaded.max_gen_toks) == (3, 12, 5)
    assert loaded.stop_token_ids == (1,) and (loaded.prefix_token_id, loaded.eot_token_id) == (0, 1)
    assert loaded.tok_encode("The cat") == ours.tok_encode("The cat") == [0] + ours.tokenizer.encode("The cat").tolist()


def test_byte_tokenizer_model_scores_from_the_formula():
    """A jaxkd-native model (ByteTokenizer, no BOS added): loglikelihood is log_softmax of the model's own
    logits summed over the continuation's bytes, an empty context is conditioned on BOS, and rolling windows
    cover every byte once (NumPy from the formula on one full forward pass per window)."""
    import jax

    from jaxkd.lm_eval_adapter import JaxkdLM

    tok = ByteTokenizer()
    config = LMConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      d_ff=32, max_len=32)
    model = lm(config)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))
    ours = JaxkdLM(model, variables, tok, batch_size=2, max_length=8)

    text = "abcdefghijklmnopqrst"  # 20 bytes: windows of 8 predicted bytes (8, 8, 4), disjoint
    ids = list(text.encode())
    sequences = [[97, 98, 99, 100], [tok.bos_id, 120, 121],
                 [tok.bos_id] + ids[:8], ids[7:16], ids[11:20]]  # the last window keeps a full context, scores 4
    # Every sequence's logits from one forward pass (right-padded to 8 inputs: causal, padding never read).
    inputs = np.zeros((len(sequences), 8), np.int32)
    for row, seq in enumerate(sequences):
        inputs[row, :len(seq) - 1] = seq[:-1]
    logits = np.asarray(jax.jit(model.apply, static_argnames="train")(variables, inputs, train=False).logits,
                        np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    # log p(seq[t + 1] | seq[:t + 1]) for t = 0 .. len(seq) - 2
    scores = [log_p[row, np.arange(len(seq) - 1), seq[1:]] for row, seq in enumerate(sequences)]

    got = ours.loglikelihood(_requests("loglikelihood", [("ab", "cd"), ("", "xy")]))
    assert got[0][0] == pytest.approx(scores[0][1:].sum(), abs=TOL)
    assert got[1][0] == pytest.approx(scores[1].sum(), abs=TOL)
    expected = scores[2].sum() + scores[3].sum() + scores[4][-4:].sum()
    (rolling,) = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(expected, abs=TOL)
    assert ours._score._cache_size() == 1  # inputs of 3, 2, 8, 8 and 8 tokens: one padded shape, one compile


def test_bad_arguments_are_named():
    from jaxkd.lm_eval_adapter import JaxkdLM, length_bucket

    assert [length_bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert length_bucket(9, 10) == 10
    with pytest.raises(ValueError, match="exceeds the cap"):
        length_bucket(11, 10)
    tok = ByteTokenizer()
    config = LMConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32,
                      max_len=32)
    model = lm(config)
    with pytest.raises(ValueError, match="max_length=64 exceeds the model's max_len=32"):
        JaxkdLM(model, {}, tok, max_length=64)
    with pytest.raises(ValueError, match="batch_size"):
        JaxkdLM(model, {}, tok, batch_size=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        JaxkdLM(model, {}, tok, stop_token_ids=[999])
    with pytest.raises(ValueError, match="LMConfig"):
        JaxkdLM(object(), {}, tok)
    with pytest.raises(ValueError, match="pretrained="):
        JaxkdLM.create_from_arg_string("batch_size=2")


def test_jaxkd_never_imports_lm_eval_and_the_adapter_names_the_extra():
    """``import jaxkd`` (and its packages) loads neither lm_eval nor torch; without lm_eval installed, importing
    the adapter is an ImportError naming the ``eval`` extra (one fresh interpreter, lm_eval hidden from it)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import jaxkd, jaxkd.models, jaxkd.data, jaxkd.methods, jaxkd.losses\n"
        "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'lm_eval':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "try:\n"
        "    import jaxkd.lm_eval_adapter\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'jaxkd[eval]'" in result.stdout, result.stdout
