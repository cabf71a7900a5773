"""CIFAR-100, resnet56 -> resnet20: the RepDistiller / mdistiller benchmark setting, every method.

The recipe and the methods' settings are in ``_cifar100_methods.py``. Published reference (Tian et al.,
ICLR 2020, Table 1; RepDistiller README): teacher 72.34, student 69.06, KD 70.66, CRD 71.16.
Needs CIFAR-100 prepared in ``data_dir`` (see ``jaxkd.data.load_split``); a GPU or TPU is the practical way
to run it:

    python -m experiments.distill --config experiments/configs/cifar100_resnet56_resnet20.py --set data_dir=/path/to/tfds
"""

from experiments.configs._cifar100_methods import recipe


def get_config():
    # ReviewKD's official weight for this pair is 0.6; ND's recipe is CE + 1.0 KD + 2 ND.
    return recipe("cifar100_resnet56_resnet20", teacher="resnet56", student="resnet20", reviewkd_weight=0.6, nd_kd_weight=1.0)
