"""Fusion losses: several models into one target: token alignment across vocabularies, fused distributions,
graphs over logits, decoding-time logit arithmetic (FuseLLM, InfiGFusion).

A new one is a file here, ``jaxkd/losses/fusion/<method>.py``, defining the loss named after its
method; :mod:`jaxkd.losses` exports it.
"""
