"""The default experiment: scikit-learn's bundled 8x8 digits (offline), resnet20 -> resnet8, few labels.

The student sees only `labels_per_class` labeled images per class, so it is weak enough for a
teacher trained on the whole training split to matter.
"""

from experiments.config import Config


def get_config() -> Config:
    return Config(
        name="digits_kd",
        dataset="digits",
        augment="shift",
        teacher="resnet20",
        teacher_steps=400,
        teacher_lr=0.05,
        student="resnet8",
        labels_per_class=10,
        steps=400,
        lr=0.05,
        batch_size=64,
        methods={"scratch": "ce", "kd": "ce + kd(temperature=4)"},
        seeds=(0, 1, 2),
        eval_every=50,
    )
