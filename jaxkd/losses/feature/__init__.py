"""Feature losses: they read intermediate features: hints through connectors, attention maps, relations
between examples, contrastive objectives, features projected to logits (FitNets, AT, RKD, CRD, ReviewKD, OFA,
ND).

A new one is a file here, ``jaxkd/losses/feature/<method>.py``, defining the loss named after its
method; :mod:`jaxkd.losses` exports it.
"""
