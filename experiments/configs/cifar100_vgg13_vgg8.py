"""CIFAR-100, vgg13 -> vgg8 (both with BatchNorm): the RepDistiller / mdistiller benchmark setting, every method.

The recipe and the methods' settings are in ``_cifar100_methods.py``. Published reference (Tian et al.,
ICLR 2020, Table 1; RepDistiller README): teacher 74.64, student 70.36, KD 72.98, FitNet 71.02, AT 71.43,
CRD 73.94. The published teacher (RepDistiller's ``vgg13_vanilla/ckpt_epoch_240.pth``) loads instead of
training one:

    python -m experiments.distill --config experiments/configs/cifar100_vgg13_vgg8.py --set data_dir=/path/to/tfds \\
        --set teacher_checkpoint=/path/to/vgg13_vanilla/ckpt_epoch_240.pth
"""

from experiments.configs._cifar100_methods import recipe


def get_config():
    # ReviewKD's official script has no vgg pair: 5.0, its weight for most pairs. ND's script has none
    # either: 1.0, its weight for resnet56 -> resnet20.
    # OFD on a VGG: the BatchNorm before each stage's ReLU is the block's last (the official get_bn_before_relu
    # of vgg.py), and the official VGG has four pre-ReLU stage features.
    ofd = ("ce + 0.001 * ofd(student_features=('stage1_preact', 'stage2_preact', 'stage3_preact', 'stage4_preact'), "
           "teacher_bns=('block1_bn1', 'block2_bn1', 'block3_bn1', 'block4_bn1'))")
    return recipe("cifar100_vgg13_vgg8", teacher="vgg13", student="vgg8", reviewkd_weight=5.0, nd_kd_weight=1.0,
                  overrides={"ofd": ofd})
