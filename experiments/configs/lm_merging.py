"""The default merging-of-distilled-students run (``python -m experiments.lm_merging``): a 4-layer base LM tuned
into two teachers on ``encodings/`` and ``asyncio/``, a 2-layer student distilled from each on its domain, the two
students merged. The bases are lm_fusion's (the same settings: a run of either reuses them from
``runs/fusion_models``). One seed. 5.7 min on 2 CPU cores from nothing (corpus, seven models, compiles; measured),
1.4 min when the four pretrained models are cached."""

from experiments.lm_merging import LMMergingExperiment


def get_config() -> LMMergingExperiment:
    return LMMergingExperiment(
        name="stdlib_merging",
        seq_len=128,
        domains=("encodings", "asyncio"),
        max_general_files=200,
        max_eval_rows=48,
        large=dict(d_model=128, num_layers=4, num_heads=4, d_ff=384),
        small=dict(d_model=64, num_layers=2, num_heads=2, d_ff=192),
        base_steps=300,
        base_lr=3e-3,
        teacher_steps=150,
        teacher_lr=1e-3,
        student_steps=150,
        student_lr=1e-3,
        method="lm_ce + token_kd()",
        batch_size=16,
        seed=0,
    )
