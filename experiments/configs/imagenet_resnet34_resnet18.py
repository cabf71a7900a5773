"""ImageNet (ILSVRC 2012), ResNet-34 -> ResNet-18: torchdistill's KD and knowledge-review (ReviewKD) rows.

Published top-1 of the ResNet-18 student (torchdistill, ``docs/source/_static/benchmarks/imagenet-resnet18_kd.tsv``,
github.com/yoshitomo-matsubara/torchdistill): **KD 71.37**, **ReviewKD ("KR") 71.64** (the ReviewKD paper,
Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021: 71.61); torchvision's pretrained
ResNet-18 trained without a teacher: 69.76. The teacher is torchvision's pretrained ResNet-34
(``ResNet34_Weights.IMAGENET1K_V1``, 73.31), loaded, not trained::

    python -m experiments.distill --config experiments/configs/imagenet_resnet34_resnet18.py \\
        --set data_dir=/path/to/tfds --set teacher_checkpoint=/path/to/resnet34.pth

``imagenet2012`` must be prepared in ``data_dir`` as array_record (``tfds build imagenet2012 --file_format
array_record`` with the ILSVRC 2012 tar files in its manual directory); it is streamed, never held in memory
(``experiments/streamed_data.py``). A run is 100 epochs of 1.28M images per method: accelerator hardware only.

The recipe is torchdistill's ``configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/kd-resnet18_from_resnet34.yaml``
(the KD row): 100 epochs at batch 256, SGD lr 0.1 (x0.1 at epochs 30, 60, 90), momentum 0.9, weight decay 1e-4;
train: RandomResizedCrop(224) + horizontal flip, eval: Resize(256) + CenterCrop(224), ImageNet mean/std;
``KDLoss(temperature=1, alpha=0.5)`` = ``0.5 · CE + 0.5 · T² · KL`` at T = 1.

ReviewKD follows ``configs/official/ilsvrc2012/yoshitomo-matsubara/nlp-oss2023/kr-resnet18_from_resnet34.yaml``:
CE plus one hierarchical context loss (pyramid 4, 2, 1) per level, each with weight 1, between the student's ABF
outputs (mid channels 512) and the teacher's features: the inputs of ``layer1``…``layer4``'s last ReLU (the
residual sums, ``stage1_preact``…``stage4_preact`` here) and the pooled embedding, the student's ABFs fed the
same features of the student; no warm-up. That file trains at batch 32 with lr 0.025 (same epochs and
milestones); this config runs both rows under the KD recipe above. To reproduce the KR row's own recipe::

    --set batch_size=32 --set lr=0.025 --set steps=4003600 --set eval_every=40036 \\
    --set "methods={'reviewkd': '<the reviewkd spec below>'}"

Differences from torchdistill that remain: one process's global batch (torchdistill's logs are from 3 GPUs with
``-adjust_lr``, or 1 GPU), the last partial batch of each epoch is dropped, top-1 is the last epoch's (not the
best epoch's), and images are decoded by TFDS / resized by Pillow as torchvision does on PIL images.
"""

from experiments.config import Config

TRAIN_IMAGES = 1_281_167
BATCH = 256
EPOCH = TRAIN_IMAGES // BATCH  # 5004 steps
STEPS = 100 * EPOCH

_FEATURES = "('stage1_preact', 'stage2_preact', 'stage3_preact', 'stage4_preact', 'pooled')"

METHODS = {
    "kd": "0.5 * ce + 0.5 * kd(temperature=1)",
    "reviewkd": f"ce + reviewkd(student_features={_FEATURES}, teacher_features={_FEATURES}, max_mid_channels=512)",
}


def get_config() -> Config:
    return Config(
        name="imagenet_resnet34_resnet18",
        dataset="imagenet2012",
        train_split="train",
        test_split="validation",
        augment="crop_flip",  # streamed data: the random resized crop + flip (experiments/streamed_data.py)
        image_size=224,
        resize_size=256,
        teacher="resnet34",
        # Only used when no teacher_checkpoint is given (torchvision's own recipe is 90 epochs at lr 0.1).
        teacher_steps=STEPS,
        teacher_lr=0.1,
        student="resnet18",
        steps=STEPS,
        lr=0.1,
        batch_size=BATCH,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="multistep",
        milestones=(0.3, 0.6, 0.9),
        methods=dict(METHODS),
        seeds=(0,),
        eval_every=EPOCH,
        eval_batch_size=128,
        checkpoint_every=1000,
    )
