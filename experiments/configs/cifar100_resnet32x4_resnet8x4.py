"""CIFAR-100, resnet32x4 -> resnet8x4: the RepDistiller / mdistiller benchmark setting.

240 epochs of 50000 images at batch 64 (187,500 steps), SGD lr 0.05 (x0.1 at epochs 150, 180, 210),
momentum 0.9, weight decay 5e-4, pad-4 crop + flip. Every method with its paper's recipe
(`_cifar100_methods.py`). Published reference (Tian et al., ICLR 2020, Table 1; RepDistiller README):
teacher 79.42, student 72.50, KD 73.33, FitNet 73.50, AT 73.44, RKD 71.90, CRD 75.51. Needs CIFAR-100
prepared in `data_dir` (see `jaxkd.data.load_split`); a GPU or TPU is the practical way to run it:

    python -m experiments.distill --config experiments/configs/cifar100_resnet32x4_resnet8x4.py \
        --set data_dir=/path/to/tfds
"""

from experiments.config import Config
from experiments.configs import _cifar100_methods as cifar100_methods

STEPS = 240 * 50_000 // 64


def get_config() -> Config:
    return Config(
        name="cifar100_resnet32x4_resnet8x4",
        dataset="cifar100",
        augment="crop_flip",
        teacher="resnet32x4",
        teacher_steps=STEPS,
        teacher_lr=0.05,
        student="resnet8x4",
        steps=STEPS,
        lr=0.05,
        batch_size=64,
        schedule="multistep",
        milestones=(150 / 240, 180 / 240, 210 / 240),
        # ReviewKD's official weight for this pair is 5; ND's recipe is CE + 3.5 KD + 2 ND.
        methods=cifar100_methods.methods(reviewkd_weight=5.0, nd_kd_weight=3.5),
        seeds=(0, 1, 2),
        eval_every=5 * 50_000 // 64,
        eval_batch_size=500,
    )
