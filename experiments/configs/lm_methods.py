"""Every LM distillation method of jaxkd on the stdlib corpus, one seed each, the default run's teacher and
student: the method table of the README (`python -m experiments.lm_distill --config
experiments/configs/lm_methods.py`). Sampling methods continue each row's first 64 bytes."""

from experiments.lm_distill import LMExperiment

P = 64  # prompt bytes of the sampling methods (rows are 128 bytes)

METHODS = {
    "scratch": "lm_ce",
    "forward_kl": "lm_ce + token_kd(divergence='forward_kl')",
    "forward_kl_fused": "lm_ce + token_kd(divergence='forward_kl', fused=True)",
    "reverse_kl": "lm_ce + token_kd(divergence='reverse_kl')",
    "generalized_jsd": "lm_ce + token_kd(divergence='generalized_jsd', beta=0.5)",
    "skew_kl": "lm_ce + token_kd(divergence='skew_kl', alpha=0.1)",
    "skew_reverse_kl": "lm_ce + token_kd(divergence='skew_reverse_kl', alpha=0.1)",
    "total_variation": "lm_ce + token_kd(divergence='total_variation')",
    "sparse_top16_cached": "lm_ce + sparse_token_kd(k=16, cached=True)",
    "taid": "lm_ce + taid(total_steps=steps, tokens=True)",
    "seqkd": f"lm_ce + seqkd(prompt_length={P})",
    "gkd": f"lm_ce + gkd(lmbda=0.5, beta=0.5, prompt_length={P})",
    "distillm": f"lm_ce + distillm(prompt_length={P}, init_threshold=0.2)",
    "minillm": f"lm_ce + minillm(prompt_length={P})",
    "llava_mod": f"llava_mod(mimic_steps=300, prompt_length={P})",
    "adpa": f"lm_ce + token_kd + adpa(prompt_length={P})",
    "dac_kl": "lm_ce + dac_kl",
    "infigfusion": "lm_ce + token_kd + infigfusion(k=10)",
    "fusellm": "fusellm(teachers=('teacher', 'teacher_b'))",
}


def get_config() -> LMExperiment:
    return LMExperiment(
        name="lm_methods",
        methods=METHODS,
        seeds=(0,),
        extra_teachers={
            # FuseLLM's second source model: another architecture, pretrained the same way.
            "teacher_b": dict(d_model=96, num_layers=3, num_heads=4, d_ff=288),
            # ADPA's reference: the teacher's architecture with a quarter of its pretraining.
            "reference": dict(d_model=128, num_layers=4, num_heads=4, d_ff=384, steps=250),
        },
    )
