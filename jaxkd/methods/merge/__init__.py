"""Merge methods: losses that train the coefficients of a merge in parameter space (Expert Merging), over a
student built by :mod:`jaxkd.merging`.

A new one is a file here, ``jaxkd/methods/merge/<method>.py``, that registers its factory
(:func:`jaxkd.methods.register`); :mod:`jaxkd.methods` exports it and :func:`jaxkd.methods.parse` finds it.
"""
