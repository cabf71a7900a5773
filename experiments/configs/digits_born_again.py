"""Born-again networks on digits (experiments/born_again.py): resnet8 generations, each distilled from the last.

Generation 0 is the default experiment's `scratch` student (resnet8 on 10 labeled images per class, `ce`);
generations 1-3 are fresh resnet8s trained with the default experiment's KD recipe from the previous generation,
and BANE ensembles generations 1-3.
"""

from experiments.born_again import BornAgainConfig


def get_config() -> BornAgainConfig:
    return BornAgainConfig(
        name="digits_born_again",
        dataset="digits",
        augment="shift",
        student="resnet8",
        labels_per_class=10,
        steps=400,
        lr=0.05,
        batch_size=64,
        generations=3,
        first_method="ce",
        method="ce + kd(temperature=4)",
        ensemble=True,
        seeds=(0, 1, 2),
        eval_every=50,
    )
