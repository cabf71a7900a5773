"""Language-model methods: next-token targets under padding masks, on-policy generation, policy-gradient and
preference distillation, cross-tokenizer likelihood matching (GKD, MiniLLM, DistiLLM, ALM).

A new one is a file here, ``jaxkd/methods/lm/<method>.py``, that registers its factory
(:func:`jaxkd.methods.register`); :mod:`jaxkd.methods` exports it and :func:`jaxkd.methods.parse` finds it.
"""
