"""Language-model losses: next-token targets under padding masks, on-policy generation, policy-gradient and
preference distillation, cross-tokenizer likelihood matching (GKD, MiniLLM, DistiLLM, ALM).

A new one is a file here, ``jaxkd/losses/lm/<method>.py``, defining the loss named after its
method; :mod:`jaxkd.losses` exports it.
"""
