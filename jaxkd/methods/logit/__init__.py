"""Logit methods: a learner's logits against a target's: over classes or over a vocabulary's tokens (KD, the
divergences, DKD, DIST, NKD, TAID, online and multi-teacher KD).

A new one is a file here, ``jaxkd/methods/logit/<method>.py``, that registers its factory
(:func:`jaxkd.methods.register`); :mod:`jaxkd.methods` exports it and :func:`jaxkd.methods.parse` finds it.
"""
