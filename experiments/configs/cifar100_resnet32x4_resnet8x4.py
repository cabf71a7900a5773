"""CIFAR-100, resnet32x4 -> resnet8x4: the RepDistiller / mdistiller benchmark setting, every method.

The recipe and the methods' settings are in ``_cifar100_methods.py``. Published reference (Tian et al.,
ICLR 2020, Table 1; RepDistiller README): teacher 79.42, student 72.50, KD 73.33, FitNet 73.50, AT 73.44, RKD 71.90, CRD 75.51.
Needs CIFAR-100 prepared in ``data_dir`` (see ``jaxkd.data.load_split``); a GPU or TPU is the practical way
to run it:

    python -m experiments.distill --config experiments/configs/cifar100_resnet32x4_resnet8x4.py --set data_dir=/path/to/tfds
"""

from experiments.configs._cifar100_methods import recipe


def get_config():
    # ReviewKD's official weight for this pair is 5.0; ND's recipe is CE + 3.5 KD + 2 ND.
    return recipe("cifar100_resnet32x4_resnet8x4", teacher="resnet32x4", student="resnet8x4", reviewkd_weight=5.0, nd_kd_weight=3.5)
