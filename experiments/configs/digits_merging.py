"""The default merging run (``python -m experiments.merging``): a 2-hidden-layer MLP trained briefly on all ten
digits (the base), fine-tuned into three experts on {0,1,2}, {3,4,5} and {6,7,8,9}, merged by every method of
jaxkd.merging; three seeds. 1.6 min on 2 CPU cores without a compilation cache (measured)."""

from experiments.merging import MergingExperiment


def get_config() -> MergingExperiment:
    return MergingExperiment(
        name="digits_merging",
        model="mlp",
        model_kwargs={"hidden_sizes": (64, 64)},
        subsets=((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)),
        val_per_class=10,
        base_steps=20,
        base_lr=0.05,
        expert_steps=150,
        expert_lr=0.02,
        seeds=(0, 1, 2),
    )
