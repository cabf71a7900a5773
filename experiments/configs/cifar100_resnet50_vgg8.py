"""CIFAR-100, ResNet50 -> vgg8: the RepDistiller / mdistiller cross-architecture setting, every method.

The recipe and the methods' settings are in ``_cifar100_methods.py``. Published reference (Tian et al., ICLR
2020, Table 2; RepDistiller README): teacher 79.34, student 70.36, KD 73.81, FitNet 70.69, AT 71.84, CRD 74.30.
The published teacher (RepDistiller's ``ResNet50_vanilla/ckpt_epoch_240.pth``) loads instead of training one:

    python -m experiments.distill --config experiments/configs/cifar100_resnet50_vgg8.py \\
        --set data_dir=/path/to/tfds --set teacher_checkpoint=/path/to/ResNet50_vanilla/ckpt_epoch_240.pth
"""

from experiments.configs._cifar100_methods import cross_architecture, recipe


def get_config():
    # ReviewKD's official script has no ResNet50 pair: 5.0, its weight for most pairs. ND's script has none
    # either: 1.0, its weight for resnet56 -> resnet20.
    # vgg8's stage1-stage3 are 16, 8 and 4 pixels; its stage4 is 4x4 like ResNet50's.
    overrides = cross_architecture(student_stages=("stage1_preact", "stage2_preact", "stage3_preact"),
                                   last=("stage4", "stage4"))
    return recipe("cifar100_resnet50_vgg8", teacher="ResNet50", student="vgg8", reviewkd_weight=5.0, nd_kd_weight=1.0,
                  overrides=overrides)
