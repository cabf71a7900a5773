"""Tf-KD_self on digits (experiments/born_again.py): one born-again generation, the trained resnet8 as its own teacher.

The official `loss_kd_self` (yuanli2333/Teacher-free-Knowledge-Distillation, my_loss_function.py) is
`(1 - α)·CE + α·multiplier·T²·KLDivLoss()(...)`, whose default mean reduction also divides by the K classes: with
the ResNet-18 self-teacher settings (α 0.95, T 6, multiplier 50) and K = 10, the KD weight is 0.95·50/10 = 4.75 on
jaxkd's batch-mean `kd` (which carries the T² itself).
"""

from experiments.born_again import BornAgainConfig


def get_config() -> BornAgainConfig:
    return BornAgainConfig(
        name="digits_tf_kd_self",
        dataset="digits",
        augment="shift",
        student="resnet8",
        labels_per_class=10,
        steps=400,
        lr=0.05,
        batch_size=64,
        generations=1,
        first_method="ce",
        method="0.05 * ce + 4.75 * kd(temperature=6)",
        ensemble=False,
        seeds=(0, 1, 2),
        eval_every=50,
    )
