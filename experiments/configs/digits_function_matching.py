"""Function matching (Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR
2022) on the default digits setting (resnet20 -> resnet8, 10 labels per class), with a patient schedule: 5x
the default student steps (``--set steps=4000`` for 10x; 2000 keeps the command to a few minutes on 2 CPU
cores).

    python -m experiments.distill --config experiments/configs/digits_function_matching.py

Compared, each for 2000 steps: the label-only student, Hinton KD, KD on mixup batches (Choi et al., WACV 2023:
``mixup(alpha=1) + ce + kd(temperature=4)``, the teacher sees the mixed images too) and function matching
(``function_matching()``: an inception crop, a flip and mixup of the whole batch built inside the compiled
step, the same view for teacher and student, then KL at T = 1 and no labels). Besides top-1, the table reports
the teacher-student distances big_vision's distill evaluators report: top-1 agreement and KL(teacher ‖ student)
on the test images.
"""

import dataclasses

from experiments.config import Config
from experiments.configs import digits


def get_config() -> Config:
    return dataclasses.replace(
        digits.get_config(),
        name="digits_function_matching",
        steps=2000,
        eval_every=250,
        checkpoint_every=500,
        methods={
            "scratch": "ce",
            "kd": "ce + kd(temperature=4)",
            "mixup_kd": "mixup(alpha=1) + ce + kd(temperature=4)",
            "function_matching": "function_matching()",
        },
        eval_metrics=("agreement", "teacher_student_kl"),
    )
