"""A heterogeneous pair (OFA-KD's case): a ViT teacher distilled into a CNN student on the default digits
setting (10 labels per class, 400 steps, 3 seeds).

    python -m experiments.distill --config experiments/configs/digits_vit_teacher.py

The teacher is a small ViT (patch 2 on 8x8 digits: 16 patch tokens and a class token, 4 pre-LN blocks of
width 64), trained on the whole training split like the default teacher but for 1200 steps; the student is the default
resnet8. Logit KD needs nothing of the teacher's architecture; OFA-KD projects the student's intermediate
maps to logit space with branch heads, which is what makes it apply to any pair.
"""

import dataclasses

from experiments.config import Config
from experiments.configs import digits


def get_config() -> Config:
    return dataclasses.replace(
        digits.get_config(),
        name="digits_vit_teacher",
        teacher="vit",
        teacher_kwargs={"patch_size": 2, "hidden": 64, "depth": 4, "heads": 4, "mlp_dim": 128},
        teacher_steps=1200,  # a ViT has no convolutional prior: 400 steps leave it at ~86% on digits
        teacher_lr=0.05,
        methods={
            "scratch": "ce",
            "kd": "ce + kd(temperature=4)",
            "ofa": "ce + ofa",
            "dist": "ce + dist(beta=2, gamma=2, temperature=4)",
        },
    )
