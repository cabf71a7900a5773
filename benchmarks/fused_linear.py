"""Memory and time of a token divergence's value-and-gradient: materialized logits vs the fused projection.

    python benchmarks/fused_linear.py [--tokens 4096] [--dim 256] [--vocab 32768] \
        [--chunk-sizes 256,512,1024] [--repeats 5] [--divergences forward_kl,reverse_kl,generalized_jsd]

For each divergence it compiles ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` (gradients with
respect to the student's hidden states and head) of

* naive: ``divergence(h_S @ W_S, h_T @ W_T, mask=mask)`` with the ``[N, V]`` logits materialized;
* fused: :func:`jaxkd.losses.fused_linear_divergence` at each chunk size,

and prints a markdown table of XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``:
the buffers the program needs besides its arguments and outputs), the ratio fused / naive, and the wall
time of one call (median of ``--repeats`` after a warm-up call, ``block_until_ready``; naive and fused
programs interleaved, see :func:`median_ms`). float32, a random
mask with about 10 % of the tokens masked; the teacher has the student's hidden size.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import losses

MIB = 2.0**20


def median_ms(programs: dict, args, repeats: int) -> dict:
    """Median wall time (ms) of one call of each program. The programs run round-robin, one call each
    per repeat after one warm-up call each, so that load from other processes on a shared machine falls
    on all of them alike instead of on whichever ran during a busy spell."""
    for program in programs.values():
        jax.block_until_ready(program(*args))  # warm-up (and first touch of the buffers)
    times = {key: [] for key in programs}
    for _ in range(repeats):
        for key, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * float(np.median(t)) for key, t in times.items()}


def compiled(loss, args):
    """The jitted value-and-grad of ``loss`` compiled for ``args`` and its temporary memory in MiB."""
    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return program, program.memory_analysis().temp_size_in_bytes / MIB


def naive_loss(name: str):
    fn = getattr(losses, name)
    return lambda hs, ws, ht, wt, mask: fn(hs @ ws, ht @ wt, mask=mask)


def fused_loss(name: str, chunk_size: int):
    return lambda hs, ws, ht, wt, mask: losses.fused_linear_divergence(
        hs, ws, ht, wt, divergence=name, mask=mask, chunk_size=chunk_size
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk-sizes", default="256,512,1024", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--divergences", default="forward_kl,reverse_kl,generalized_jsd", help="comma-separated")
    args = parser.parse_args(argv)
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    n, d, v = args.tokens, args.dim, args.vocab

    rng = np.random.default_rng(0)
    inputs = (
        jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32),
        jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32),
        jnp.asarray(rng.random(n) > 0.1),
    )
    device = jax.devices()[0]
    print(f"N={n} tokens, d={d}, V={v}, float32, value_and_grad w.r.t. (hidden, head); "
          f"{jax.default_backend()} ({device.device_kind}), median of {args.repeats}")
    print()
    print("| divergence | chunk size | naive temp (MiB) | fused temp (MiB) | memory ratio | naive (ms) "
          "| fused (ms) | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.divergences.split(","):
        programs, mib = {}, {}
        programs["naive"], mib["naive"] = compiled(naive_loss(name), inputs)
        for chunk in chunk_sizes:
            programs[chunk], mib[chunk] = compiled(fused_loss(name, chunk), inputs)
        ms = median_ms(programs, inputs, args.repeats)
        for chunk in chunk_sizes:
            print(f"| {name} | {chunk} | {mib['naive']:.0f} | {mib[chunk]:.0f} | {mib[chunk] / mib['naive']:.3f} "
                  f"| {ms['naive']:.0f} | {ms[chunk]:.0f} | {ms[chunk] / ms['naive']:.2f} |", flush=True)

if __name__ == "__main__":
    main()
