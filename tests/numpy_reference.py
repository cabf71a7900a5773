"""Float64 NumPy references shared by the per-method value tests (tests/test_<method>.py).

Written from the formulas, never through jaxkd: they are the independent side of every comparison.
Each works along the last (class) axis (the KLs and the entropy take float64 probabilities); those taking
logits cast them to float64 before any arithmetic, so a ``temperature`` argument divides float64 logits,
while a test that writes ``np_softmax(z / T)`` divides its (float32) logits itself, before the cast.
Helpers that belong to one method's formula stay in that method's test file.

Conventions that differ are kept apart, not merged:

* excluded classes: ``np_softmax`` and ``np_log_softmax`` take every entry as it is (a -inf logit has
  probability 0; a row that is all -inf, or holds a NaN or +inf, comes out NaN), while
  ``np_masked_softmax`` and ``np_masked_log_softmax`` exclude every non-finite logit and give a row with
  no finite logit no mass at all;
* KL terms: ``np_kl`` and ``np_kl_logits`` sum over p > 0 (0·log 0 = 0; p > 0 = q gives +inf), while
  ``np_kl_finite`` also drops the +inf terms, as the logit divergences document.
"""

import numpy as np


def rand_logits(seed, shape=(6, 5), scale=3.0):
    """float32 logits ``scale · N(0, 1)`` drawn from ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def np_softmax(z, temperature=1.0):
    """softmax(z/T)_j = e_j / Σ_k e_k, e_j = exp(z_j/T − max_k z_k/T)."""
    z = np.asarray(z, np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(z, temperature=1.0):
    """log softmax(z/T)_j = z_j/T − m − log Σ_k exp(z_k/T − m), m = max_k z_k/T."""
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_masked_log_softmax(z, temperature=1.0):
    """log softmax(z/T) over the finite entries F of each row: z_j/T − m − log Σ_{k∈F} exp(z_k/T − m) with
    m = max_{k∈F} z_k/T; -inf for j ∉ F, and for every entry of a row with F empty."""
    z = np.asarray(z, np.float64) / temperature
    fin = np.isfinite(z)
    hi = np.max(np.where(fin, z, -np.inf), axis=-1, keepdims=True)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    total = np.where(fin, np.exp(np.where(fin, z - hi, 0.0)), 0.0).sum(-1, keepdims=True)
    return np.where(fin, z - hi - np.log(np.where(total > 0, total, 1.0)), -np.inf)


def np_masked_softmax(z, temperature=1.0):
    """exp(np_masked_log_softmax(z, T)): softmax(z/T) over the finite entries, 0 elsewhere (a row with no
    finite entry is all 0)."""
    return np.exp(np_masked_log_softmax(z, temperature))


def np_kl(p, q):
    """KL(p ‖ q) = Σ_{j: p_j > 0} p_j (log p_j − log q_j): 0·log 0 = 0, and p_j > 0 = q_j gives +inf."""
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.where(p > 0, q, 1))), 0.0), -1)


def np_kl_finite(p, q):
    """Σ_{j: p_j > 0, q_j > 0} p_j log(p_j / q_j): KL(p ‖ q) with its +inf terms (p_j > 0 = q_j) dropped."""
    ok = (p > 0) & (q > 0)
    return np.where(ok, p * np.log(np.where(ok, p, 1.0) / np.where(ok, q, 1.0)), 0.0).sum(-1)


def np_kl_logits(p_logits, q_logits, temperature=1.0):
    """KL(softmax(p/T) ‖ softmax(q/T)) = Σ_{j: p_j > 0} p_j (lp_j − lq_j) with lp, lq the np_log_softmax of
    p/T and q/T, p = exp(lp)."""
    lp, lq = np_log_softmax(p_logits, temperature), np_log_softmax(q_logits, temperature)
    p = np.exp(lp)
    return np.sum(np.where(p > 0, p * (np.where(p > 0, lp, 0.0) - lq), 0.0), -1)


def np_entropy(p):
    """H(p) = −Σ_{j: p_j > 0} p_j log p_j (0·log 0 = 0)."""
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), -1)


def np_ce(z, y):
    """Per-example cross-entropy −log softmax(z_n)_{y_n} of rows z_n and integer labels y_n."""
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_standardize(z, eps=1e-7):
    """The official ``normalize`` of logit standardization, per row of a 2-D z over its finite entries F:
    (z_j − mean_F z) / (eps + std_F(z, ddof=1)) for j ∈ F, -inf elsewhere."""
    z = np.asarray(z, np.float64)
    out = np.full_like(z, -np.inf)
    for n in range(z.shape[0]):
        keep = np.isfinite(z[n])
        v = z[n][keep]
        out[n][keep] = (v - v.mean()) / (eps + v.std(ddof=1))
    return out
