"""The full cross-tokenizer table: the default LM experiment's byte-level teacher (0.9M parameters, shared
through ``<out_dir>/teachers``) distilled with ALM into a 0.14M student over a 512-token BPE learned on the
training files, against the same BPE student on data alone and, for reference, the byte-level student of
the LM experiment on the same windows, 3 seeds
(``python -m experiments.lm_cross_tokenizer --config experiments/configs/lm_cross_tokenizer.py``; the
default run without a config is the two BPE rows only)."""

from experiments.lm_cross_tokenizer import BPE_SCRATCH, CrossTokenizerExperiment


def get_config() -> CrossTokenizerExperiment:
    return CrossTokenizerExperiment(
        name="lm_cross_tokenizer",
        bpe_vocab_size=512,
        student_len=96,
        methods={
            "byte_scratch": "lm_ce",
            "bpe_scratch": BPE_SCRATCH,
            # tokenkit's binarisation temperature; the weight τ makes the term's gradient comparable to the
            # cross-entropy's (tokenkit balances its losses by gradient magnitude instead). The teacher's
            # target log-probabilities are computed once (cached=True: same loss, no teacher in the step).
            "bpe_alm": BPE_SCRATCH + " + 100 * alm(temperature=100.0, cached=True)",
        },
    )
