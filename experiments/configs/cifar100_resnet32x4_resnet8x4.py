"""CIFAR-100, resnet32x4 -> resnet8x4: the RepDistiller / mdistiller benchmark setting.

240 epochs of 50000 images at batch 64 (187,500 steps), SGD lr 0.05 (x0.1 at epochs 150, 180, 210),
momentum 0.9, weight decay 5e-4, pad-4 crop + flip. Published reference (RepDistiller README):
teacher 79.42, student 72.50, KD 73.33. Needs CIFAR-100 prepared in `data_dir` (see
`jaxkd.data.load_split`); a GPU or TPU is the practical way to run it.
"""

from experiments.config import Config

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
        # RepDistiller `-r 0.1 -a 0.9`, mdistiller KD: CE weight 0.1, KD weight 0.9, T = 4.
        methods={"scratch": "ce", "kd": "0.1 * ce + 0.9 * kd(temperature=4)"},
        seeds=(0, 1, 2),
        eval_every=5 * 50_000 // 64,
        eval_batch_size=500,
    )
