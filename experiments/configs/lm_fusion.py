"""The default decoding-time fusion run (``python -m experiments.lm_fusion``): a 4-layer base LM steered by
2-layer experts tuned on two stdlib packages, ``encodings/`` (codec modules, mostly generated charmap
tables: far from the rest of the library) and ``asyncio/`` (ordinary library code with its own idioms).

About 6 minutes on 2 CPU cores; the four trained models are cached in ``runs/fusion_models``, so a re-run
only scores and samples.
"""

from experiments.lm_fusion import LMFusionExperiment


def get_config() -> LMFusionExperiment:
    return LMFusionExperiment(
        name="stdlib_fusion",
        seq_len=128,
        domains=("encodings", "asyncio"),
        max_general_files=200,
        max_eval_rows=48,
        large=dict(d_model=128, num_layers=4, num_heads=4, d_ff=384),
        small=dict(d_model=64, num_layers=2, num_heads=2, d_ff=192),
        base_steps=300,
        base_lr=3e-3,
        tune_steps=150,
        tune_lr=1e-3,
        warmup_steps=30,
        batch_size=16,
        alpha=1.0,
        prompt_bytes=40,
        new_tokens=80,
        seed=0,
    )
