"""Tf-KD_self on digits (experiments/born_again.py): one born-again generation, the trained resnet8 as its own teacher.

The official `loss_kd_self` (yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py) is
`(1 - α)·CE + α·multiplier·T²·KLDivLoss()(...)`, whose default mean reduction also divides by the K classes: with
the ResNet-18 self-teacher settings (α 0.95, T 6, multiplier 50) and K = 10, the KD weight is 0.95·50/10 = 4.75 on
jaxkd's batch-mean `kd` (which carries the T² itself).
"""

import dataclasses

from experiments.born_again import BornAgainConfig
from experiments.configs import digits_born_again


def get_config() -> BornAgainConfig:
    # The born-again setting (digits, resnet8, 10 labels per class, 400 steps, 3 seeds), one generation.
    return dataclasses.replace(digits_born_again.get_config(), name="digits_tf_kd_self", generations=1,
                               method="0.05 * ce + 4.75 * kd(temperature=6)", ensemble=False)
