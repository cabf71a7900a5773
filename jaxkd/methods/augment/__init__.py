"""Batch transforms as methods: mixup, CutMix, the inception crop, and big_vision's function matching.

Each sets ``Method.prepare``: the train step applies it to the batch inside the compiled program, before any
participant's forward pass (frozen teachers included), so teacher and student see the same transformed view —
the *consistent* teaching of Beyer et al. (CVPR 2022). Evaluation never transforms. A transform's own loss is
0: put it in a chain with the losses, ``"mixup(alpha=1) + ce + kd(temperature=4)"``. The array functions are
in :mod:`jaxkd.batch_transforms`.
"""
