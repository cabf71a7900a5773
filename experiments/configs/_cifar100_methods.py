"""The RepDistiller CIFAR-100 recipe and every method with its paper's settings, for the benchmark configs
(``cifar100_resnet32x4_resnet8x4.py``, ``cifar100_resnet56_resnet20.py``, ``cifar100_vgg13_vgg8.py``,
``cifar100_resnet50_mobilenetv2.py``, ``cifar100_resnet50_vgg8.py``).

240 epochs of 50000 images at batch 64 (187,500 steps), SGD lr 0.05 (x0.1 at epochs 150, 180, 210),
momentum 0.9, weight decay 5e-4, pad-4 crop + flip, for teacher and student.

The weights are RepDistiller's ``scripts/run_cifar_distill.sh`` (``-r 1 -a 0 -b <weight>``: CE plus the
method, no KD term; KD itself is ``-r 0.1 -a 0.9``) and, for methods RepDistiller does not have, the
official code's CIFAR settings (noted per line). AB, FT and FSP train an initialization stage of 30
epochs first (RepDistiller's ``--init_epochs 30``); here it is the first 30 epochs of the run (``until``),
where RepDistiller adds them before its 240 epochs — a run of these three is 30 epochs shorter.
"""

from experiments.config import Config

EPOCH = 50_000 // 64  # steps per epoch at batch 64
STEPS = 240 * 50_000 // 64
INIT = 30 * EPOCH  # RepDistiller's initialization stage


def cross_architecture(*, student_stages: tuple[str, str, str], last: tuple[str, str]) -> dict[str, str | None]:
    """The overrides for a ResNet50 teacher and a student of another family (RepDistiller's Table 2 pairs).

    FSP and KD-SVD pair maps of equal channels and are not defined across architectures (RepDistiller reports
    FSP as N/A there): dropped. OFD, SimKD and TRG pair maps of equal resolution: OFD pairs the student's
    ``student_stages`` (pre-ReLU) with ResNet50's ``stage2``-``stage4`` (16, 8, 4 pixels on 32x32 images;
    margins from each stage's last ``bn3``, the BatchNorm before its ReLU: the official
    ``get_bn_before_relu`` of ``resnetv2.py``); SimKD and TRG the student map ``last[0]`` with the teacher
    map ``last[1]`` (ResNet50's last, 4x4). These feature choices are jaxkd's: no official config exists for
    these pairs.
    """
    student_last, teacher_last = last
    return {
        "fsp": None,
        "kdsvd": None,
        "ofd": (f"ce + 0.001 * ofd(student_features={student_stages!r}, "
                "teacher_features=('stage2_preact', 'stage3_preact', 'stage4_preact'), "
                "teacher_bns=('stage2_block3/bn3', 'stage3_block5/bn3', 'stage4_block2/bn3'))"),
        "simkd": f"simkd(student_feature_name={student_last!r}, teacher_feature_name={teacher_last!r})",
        "trg": f"ce + kd + trg(student_feature_name={student_last!r}, teacher_feature_name={teacher_last!r})",
    }


def methods(*, reviewkd_weight: float, nd_kd_weight: float) -> dict[str, str]:
    """The run name -> method spec table (``steps`` and ``num_examples`` are the experiment's constants)."""
    return {
        "scratch": "ce",
        "kd": "0.1 * ce + 0.9 * kd(temperature=4)",
        "fitnets": "ce + 100 * fitnets",
        "at": "ce + 1000 * at",
        "sp": "ce + 3000 * sp",
        "cc": "ce + 0.02 * cc",
        "vid": "ce + vid",
        "rkd": "ce + rkd",
        "pkt": "ce + 30000 * pkt",
        "activation_boundary": f"until({INIT}) * activation_boundary + after({INIT}) * ce",
        "factor_transfer": f"after({INIT}) * ce + factor_transfer(paraphraser_steps={INIT}, weight=200, reconstruction_weight=0.2)",
        "fsp": f"until({INIT}) * fsp + after({INIT}) * ce",
        "nst": "ce + 50 * nst",
        "kdsvd": "ce + kdsvd",
        "crd": "ce + 0.8 * crd(num_examples=num_examples)",  # nce_k 16384, T 0.07, momentum 0.5
        "crd_kd": "ce + kd(temperature=4) + 0.8 * crd(num_examples=num_examples)",
        "ofd": "ce + 0.001 * ofd",  # official: sum / batch / 1000
        "reviewkd": f"ce + {reviewkd_weight} * reviewkd(warmup_steps=20 * {EPOCH})",  # official reviewKD.sh
        "simkd": "simkd",  # official: -c 0 -d 0 -b 1
        "ickd": "ce + 2.5 * ickd",  # official: -a 0 -b 2.5
        "ofa": "ce + ofa",  # official train.py defaults: eps 1, T 1
        "nd": f"ce + {nd_kd_weight} * kd(temperature=4) + 2 * nd",  # official train_cifar.sh
        "lsskd": "ce + lsskd",
        "diswot": "ce + kd(temperature=4) + diswot",
        "trg": "ce + kd + trg",
        "dmae": "ce + kd + dmae(patch_size=4, mask_ratio=0.75)",
        "kd3": "ce + kd3",
        "lelp": "ce + lelp",
        "margin_mse": "ce + margin_mse(positive='label')",
        "listwise_kd": "ce + listwise_kd",
    }


def recipe(name: str, *, teacher: str, student: str, reviewkd_weight: float, nd_kd_weight: float,
           lr: float = 0.05, overrides: dict[str, str | None] | None = None) -> Config:
    """The RepDistiller recipe for one teacher -> student pair, with every method. ``lr`` is the student's
    (RepDistiller's ``train_student.py`` uses 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students);
    ``overrides`` replaces a method's spec for this pair (features of other names or resolutions), or drops
    it (``None``: a method that does not apply to the pair)."""
    table = methods(reviewkd_weight=reviewkd_weight, nd_kd_weight=nd_kd_weight)
    for run, spec in (overrides or {}).items():
        if run not in table:
            raise ValueError(f"recipe {name}: override of unknown method run {run!r}")
        if spec is None:
            del table[run]
        else:
            table[run] = spec
    return Config(
        name=name,
        dataset="cifar100",
        augment="crop_flip",
        teacher=teacher,
        teacher_steps=STEPS,
        teacher_lr=0.05,
        student=student,
        steps=STEPS,
        lr=lr,
        batch_size=64,
        schedule="multistep",
        milestones=(150 / 240, 180 / 240, 210 / 240),
        methods=table,
        seeds=(0, 1, 2),
        eval_every=5 * EPOCH,
        eval_batch_size=500,
    )
