"""Every feature, relational and ranking method on the default experiment's setting (digits, resnet20 ->
resnet8, 10 labels per class, 400 steps, 3 seeds), next to the scratch and KD baselines: the README's
feature-method table (the logit methods' table is ``digits_methods.py``).

    python -m experiments.distill --config experiments/configs/digits_feature_methods.py

Hyper-parameters are the papers' CIFAR-100 recipes (RepDistiller's weights and feature taps, the official
codes' settings), not tuned here; numbers that depend on the run are written in terms of the named
constants ``steps`` and ``num_examples`` (the student's labeled training images), so they follow
``--set steps=...``. resnet20 and resnet8 have the same stage widths (16, 32, 64), so FSP and KDSVD, which
compare maps channel by channel, apply as they are.
"""

import dataclasses

from experiments.config import Config
from experiments.configs import digits

METHODS = {
    "scratch": "ce",
    "kd": "ce + kd(temperature=4)",
    # Feature and relational methods: RepDistiller's weights (run_cifar_distill.sh, -a 0: no KD term) and
    # feature taps; a first stage of steps // 9 is RepDistiller's 30 initialization epochs of 270.
    "fitnets": "ce + 100 * fitnets",  # hint stage2 -> stage2, ConvReg connector
    "fitnets_2stage": "until(steps // 9) * fitnets + after(steps // 9) * (ce + kd(temperature=4))",  # the paper's
    "at": "ce + 1000 * at",
    "sp": "ce + 3000 * sp",
    "cc": "ce + 0.02 * cc",
    "vid": "ce + vid",
    "rkd": "ce + rkd",  # distance 25, angle 50
    "pkt": "ce + 30000 * pkt",
    "activation_boundary": "until(steps // 9) * activation_boundary + after(steps // 9) * ce",  # AB initializes, then CE
    "factor_transfer": "after(steps // 9) * ce + factor_transfer(paraphraser_steps=steps // 9, weight=200, reconstruction_weight=0.2)",
    "fsp": "until(steps // 9) * fsp + after(steps // 9) * ce",  # FSP initializes, then CE
    "nst": "ce + 50 * nst",
    "kdsvd": "ce + kdsvd",
    "crd": "ce + 0.8 * crd(num_examples=num_examples, nce_k=num_examples // 3)",  # official K/N ratio ~ 1/3
    "crd_kd": "ce + kd(temperature=4) + 0.8 * crd(num_examples=num_examples, nce_k=num_examples // 3)",  # CRD+KD
    "ofd": "ce + 0.001 * ofd",  # official sum / batch / 1000
    "reviewkd": "ce + 0.6 * reviewkd(warmup_steps=steps // 12)",  # official resnet56 -> resnet20 weight
    "simkd": "simkd",  # reused teacher classifier, no CE
    "ickd": "ce + 2.5 * ickd",
    # The seeds' vision methods.
    "ofa": "ce + ofa",  # branch heads on stage1-3, eps 1, T 1 (official train.py defaults)
    "nd": "ce + kd(temperature=4) + 2 * nd",  # official resnet56 -> resnet20 weights; class means in the step
    "lsskd": "ce + lsskd",  # self-distillation through auxiliary heads (no teacher)
    "diswot": "ce + kd(temperature=4) + diswot",
    "trg": "ce + kd + trg",  # stage3 2x2 maps: 4 tokens per image
    "dmae": "ce + kd + dmae(patch_size=2)",  # student sees 75% of 2x2 patches zeroed
    "kd3": "ce + kd3",
    "lelp": "ce + lelp",  # projections from the teacher's class moments, in the step
    # Ranking losses read classification logits as candidate lists: the label is the positive.
    "margin_mse": "ce + margin_mse(positive='label')",
    "listwise_kd": "ce + listwise_kd",
}


def get_config() -> Config:
    return dataclasses.replace(digits.get_config(), name="digits_feature_methods", methods=dict(METHODS))
