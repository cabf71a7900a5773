"""Distill Qwen2.5-1.5B-Instruct into Qwen2.5-0.5B on local chat JSONL and export the student
(experiments/hf_distill.py). The checkpoints and data must be in local directories (nothing is downloaded),
e.g. ``huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir checkpoints/Qwen2.5-1.5B-Instruct``.
Both models share Qwen2.5's tokenizer (151665 tokens) and their padded embeddings (151936 rows) are cut to it.

    python -m experiments.hf_distill --config experiments/configs/hf_distill.py --out runs/qwen2.5-1.5b-0.5b
"""

from experiments.hf_distill import HFDistillExperiment


def get_config() -> HFDistillExperiment:
    return HFDistillExperiment(
        name="qwen2.5_1.5b_to_0.5b",
        teacher="checkpoints/Qwen2.5-1.5B-Instruct",
        student="checkpoints/Qwen2.5-0.5B",
        train_data="data/chat_train.jsonl",
        eval_data="data/chat_eval.jsonl",
        seq_len=1024,
        pack=True,
        method="lm_ce + token_kd(divergence='forward_kl')",
        steps=1000,
        lr=5e-5,
        batch_size=16,
        microbatches=2,
        eval_every=100,
        checkpoint_every=100,
    )
