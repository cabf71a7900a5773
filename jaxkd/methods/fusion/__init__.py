"""Fusion methods: several models into one target: token alignment across vocabularies, fused distributions,
graphs over logits, decoding-time logit arithmetic (FuseLLM, InfiGFusion).

A new one is a file here, ``jaxkd/methods/fusion/<method>.py``, that registers its factory
(:func:`jaxkd.methods.register`); :mod:`jaxkd.methods` exports it and :func:`jaxkd.methods.parse` finds it.
"""
