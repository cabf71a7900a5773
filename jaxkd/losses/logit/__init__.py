"""Logit losses: a learner's logits against a target's: over classes or over a vocabulary's tokens (KD, the
divergences, DKD, DIST, NKD, TAID, online and multi-teacher KD).

A new one is a file here, ``jaxkd/losses/logit/<method>.py``, defining the loss named after its
method; :mod:`jaxkd.losses` exports it.
"""
