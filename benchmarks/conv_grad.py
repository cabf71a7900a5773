"""Kernel-gradient time of 3x3 convolutions: XLA's own transpose vs jaxkd's im2col GEMM (CPU).

    python benchmarks/conv_grad.py

Shapes are the convolutions of the CIFAR ResNets at batch 64 (stem and stages). Prints the forward
time and the kernel-gradient time (median of 5 after one warm-up) for ``lax.conv_general_dilated`` and
for :func:`jaxkd.models.conv.conv_general_dilated`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkd.models.conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")
SHAPES = [  # (size, in, out, stride)
    (32, 3, 16, 1), (32, 3, 32, 1), (32, 16, 16, 1), (32, 32, 32, 1), (32, 32, 64, 1), (32, 64, 64, 1),
    (32, 64, 128, 2), (16, 32, 32, 1), (16, 64, 64, 1), (16, 128, 128, 1), (8, 64, 64, 1), (8, 256, 256, 1),
]


def median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(batch: int = 64) -> None:
    print(f"3x3 convolution, batch {batch}, NHWC, {jax.default_backend()} ({jax.devices()[0].device_kind})")
    print("| input | channels | stride | forward (ms) | dW, XLA (ms) | dW, jaxkd im2col (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size, cin, cout, stride in SHAPES:
        x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        args = ((stride, stride), ((1, 1), (1, 1)))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
        xla = lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=DN)  # noqa: E731
        ours = lambda x, w: conv_general_dilated(x, w, *args, dimension_numbers=dn)  # noqa: E731
        g = jnp.ones_like(xla(x, w))
        fwd = median_ms(jax.jit(xla), x, w)
        t_xla = median_ms(jax.jit(lambda x, w, g: jax.vjp(lambda w: xla(x, w), w)[1](g)), x, w, g)
        t_ours = median_ms(jax.jit(lambda x, w, g: jax.vjp(lambda w: ours(x, w), w)[1](g)), x, w, g)
        print(f"| {size}x{size} | {cin}->{cout} | {stride} | {fwd:.0f} | {t_xla:.0f} | {t_ours:.0f} | {t_xla / t_ours:.1f}x |")


if __name__ == "__main__":
    main()
