"""CIFAR-100, ResNet50 -> MobileNetV2 (``mobile_half``): the RepDistiller / mdistiller cross-architecture setting,
every method.

The recipe and the methods' settings are in ``_cifar100_methods.py``; the student's learning rate is 0.01, as
RepDistiller's ``train_student.py`` sets for MobileNetV2 students. Published reference (Tian et al., ICLR 2020,
Table 2; RepDistiller README): teacher 79.34, student 64.60, KD 67.35, FitNet 63.16, AT 58.58, CRD 69.11. The
published teacher (RepDistiller's ``ResNet50_vanilla/ckpt_epoch_240.pth``) loads instead of training one:

    python -m experiments.distill --config experiments/configs/cifar100_resnet50_mobilenetv2.py \\
        --set data_dir=/path/to/tfds --set teacher_checkpoint=/path/to/ResNet50_vanilla/ckpt_epoch_240.pth
"""

from experiments.configs._cifar100_methods import cross_architecture, recipe


def get_config():
    # ReviewKD's official script has no ResNet50 pair: 5.0, its weight for most pairs. ND's script has none
    # either: 1.0, its weight for resnet56 -> resnet20.
    # MobileNetV2's stage1-stage3 are 16, 8 and 4 pixels (its stage4 is 2x2).
    overrides = cross_architecture(student_stages=("stage1_preact", "stage2_preact", "stage3_preact"),
                                   last=("stage3", "stage4"))
    return recipe("cifar100_resnet50_mobilenetv2", teacher="ResNet50", student="MobileNetV2", reviewkd_weight=5.0,
                  nd_kd_weight=1.0, lr=0.01, overrides=overrides)
