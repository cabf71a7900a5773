"""Dynamic NTK RoPE (transformers' ``rope_type="dynamic"``) against transformers: logits on sequences longer than
``max_position_embeddings`` (where the base is rescaled), greedy generation that crosses it, and the export."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxkd.models import from_hf, sampling, to_hf
from jaxkd.models.lm import lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_POSITIONS, FACTOR = 8, 2.0
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=MAX_POSITIONS,
              rope_parameters={"rope_type": "dynamic", "factor": FACTOR, "rope_theta": 100.0})


def fresh_llama():
    """A new transformers model each time: its dynamic RoPE remembers the longest sequence it has seen."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamic")
    fresh_llama().save_pretrained(path, safe_serialization=True)
    model, variables = from_hf(path)
    return path, model, variables


def hf_logits(tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return fresh_llama()(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                             position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("length,pad", [(6, "right"), (13, "right"), (13, "left")])
def test_logits_equal_transformers_below_and_past_max_position_embeddings(checkpoint, length, pad):
    _, model, variables = checkpoint
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, 128, (2, length))
    mask = np.ones((2, length), bool)
    if pad == "right":
        mask[1, length - 3:] = False
    else:
        mask[1, :3] = False
    ref = hf_logits(tokens, mask)
    got = np.asarray(model.apply(variables, {"tokens": tokens, "mask": mask}, train=False).logits)
    assert np.abs(got - ref)[mask].max() < 1e-4
    if length > MAX_POSITIONS:  # past max_position_embeddings the rescaled base matters
        unscaled = lm(dataclasses.replace(model.module.config, rope_scaling=None))  # the base left alone
        far = np.asarray(unscaled.apply(variables, {"tokens": tokens, "mask": mask}, train=False).logits)
        assert np.abs(far - ref)[mask].max() > 1e-3


def test_greedy_generation_across_max_position_embeddings_equals_transformers(checkpoint):
    _, model, variables = checkpoint
    prompt = np.random.RandomState(2).randint(0, 128, (2, 5))
    with torch.no_grad():  # 5 + 9 tokens: the decode steps pass position 8, where the base starts to grow
        ref = fresh_llama().generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long),
                                     do_sample=False, max_new_tokens=9, min_new_tokens=9, pad_token_id=0).numpy()
    out = sampling.generate(model.module.config, variables, prompt, rng=jax.random.PRNGKey(0), max_new_tokens=9,
                            temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_config_and_export(checkpoint, tmp_path):
    path, model, variables = checkpoint
    config = model.module.config
    assert config.rope_scaling_dict == {"rope_type": "dynamic", "factor": FACTOR,
                                        "original_max_position_embeddings": MAX_POSITIONS}
    assert config.max_len == int(FACTOR * MAX_POSITIONS)  # the context the scaling is for
    to_hf(model, variables, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["max_position_embeddings"] == MAX_POSITIONS
    assert written["rope_parameters"] == {"rope_type": "dynamic", "factor": FACTOR, "rope_theta": 100.0}
    again, _ = from_hf(tmp_path)
    assert again.module.config == config
