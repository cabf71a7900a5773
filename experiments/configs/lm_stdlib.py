"""The default LM distillation run: a 0.9M-parameter byte-level teacher pretrained on the Python standard
library, a 0.12M student trained on data alone and with token-level KD (forward KL), 3 seeds, on 2 CPU
cores in under 15 minutes (11 min 51 s measured, teacher included). Every other LM method:
experiments/configs/lm_methods.py."""

from experiments.lm_distill import LMExperiment


def get_config() -> LMExperiment:
    return LMExperiment(
        name="lm_stdlib",
        methods={
            "scratch": "lm_ce",
            "token_kd": "lm_ce + token_kd(divergence='forward_kl')",
        },
    )
