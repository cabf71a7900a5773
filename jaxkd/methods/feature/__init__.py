"""Feature methods: they read intermediate features: hints through connectors, attention maps, relations
between examples, contrastive objectives, features projected to logits (FitNets, AT, RKD, CRD, ReviewKD, OFA,
ND).

A new one is a file here, ``jaxkd/methods/feature/<method>.py``, that registers its factory
(:func:`jaxkd.methods.register`); :mod:`jaxkd.methods` exports it and :func:`jaxkd.methods.parse` finds it.
"""
