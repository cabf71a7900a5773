"""The vision methods added with published-teacher loading: batch transforms, teachers that move, routed and adversarial
methods and torchdistill's remaining losses, on the default experiment's setting (digits, resnet20 -> resnet8,
10 labels per class, 400 steps, 3 seeds), next to the scratch and KD baselines.

    python -m experiments.distill --config experiments/configs/digits_vision_methods.py

Hyper-parameters are the papers' or the official codes' defaults (noted per line), not tuned here. MST-Distill
routes between two teachers: the resnet20 ``teacher`` and a wrn_16_2 ``teacher2``, both trained on the full
training split. Function matching is in this table at the default 400 steps; its patient schedule (5x) is
``digits_function_matching.py``. Cached teachers change where the teacher's outputs come from, not the method:
``python -m experiments.distill --set teacher_cache=fkd`` runs the default KD from FKD region soft labels.
"""

import dataclasses

from experiments.config import Config
from experiments.configs import digits

METHODS = {
    "scratch": "ce",
    "kd": "ce + kd(temperature=4)",
    # Batch transforms inside the step (the teacher sees the transformed batch too).
    "mixup_kd": "mixup(alpha=1) + ce + kd(temperature=4)",  # Choi et al. (WACV 2023)
    "cutmix_kd": "cutmix(alpha=1) + ce + kd(temperature=4)",  # CutMix's official alpha
    "inception_crop_kd": "inception_crop() + ce + kd(temperature=4)",  # big_vision's crop defaults
    "function_matching": "function_matching()",  # crop + flip + mixup, KL at T = 1, no labels
    # Teachers that move (no trained teacher read).
    "mean_teacher": "ce + 100 * mean_teacher(decay=0.97)",  # official CIFAR-10: consistency 100 (mse), EMA 0.97
    "tf_kd_reg": "0.9 * ce + 10 * tf_kd_reg(temperature=20)",  # official ResNet-18/CIFAR-100: alpha 0.1, T 20, x100
    "byot": "ce + byot",  # shallow classifiers on stage1-2, T 3, alpha 0.3, lambda 0.03 (authors' train.py)
    # Routed and adversarial.
    "mst_distill": "ce + mst_distill(teachers=('teacher', 'teacher2'))",  # official k = 1, T = 4
    "hard": "ce + kd(temperature=4) + hard(temperature=4)",
    # torchdistill's remaining losses (their weights in torchdistill's or the official configs).
    "cc_paper": "ce + kd(temperature=1) + 0.003 * cc(form='paper', normalize=True)",
    "pad_l2": "ce + pad_l2",
    "kta_affinity": "ce + 50 * kta + affinity",  # torchdistill's KTAAD weights
    "srd": "ce + srd",  # official alpha 4 (the feature weight 2 is in the loss), tau 1
    "dist_plus": "ce + 2 * dist_plus(beta=2, gamma=2, temperature=4)",
    "sskd": "0.1 * ce + sskd",  # official CIFAR-100 weights
}


def get_config() -> Config:
    return dataclasses.replace(digits.get_config(), name="digits_vision_methods", methods=dict(METHODS),
                               teachers={"teacher2": {"model": "wrn_16_2"}})
