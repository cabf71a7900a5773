"""A 3x3 convolution's forward and input gradient on XLA:CPU: ``lax.conv`` against GEMM forms, f32 and bf16.

    python benchmarks/conv_forms.py [--batch 64] [--repeats 10]

For the 3x3 stride-1 layer shapes of resnet32x4/resnet8x4 on 32x32 inputs (NHWC), the median time of
each jitted program over ``--repeats`` calls after a warm-up:

* ``lax``: XLA's own convolution (what jaxkd's models use for the forward pass and the input gradient);
* ``im2col``: the 9 shifted input windows concatenated along channels, then one matrix product;
* ``shifted``: the sum of 9 matrix products of the shifted windows with each tap's ``[C_in, C_out]`` slice;
* ``lax bf16``: XLA's convolution on bfloat16 inputs accumulating in float32 (what a bf16 frozen teacher
  would run), next to the float32 one.

and the input gradient (``d/dx`` of the sum of squares of the output) of ``lax`` and ``im2col``. It also
prints XLA's float32 and bfloat16 2048x2048 matmul rates. This is how the CPU step was checked for the
forms that ``jaxkd/models/conv.py`` could use besides its GEMM kernel gradient (which ``conv_grad.py``
measures).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from conv_grad import median_ms as _median_ms  # benchmarks/ is the script's folder, first on sys.path
from jax import lax

SHAPES = ((32, 32, 32), (32, 64, 64), (16, 128, 128), (8, 256, 256))  # (H = W, C_in, C_out)
_NHWC = ("NHWC", "HWIO", "NHWC")


def median_ms(fn, *args, repeats: int) -> float:
    """``fn`` jitted, timed as ``conv_grad.py`` times (median of ``repeats`` calls after a warm-up)."""
    return _median_ms(jax.jit(fn), *args, repeats=repeats)


def conv_lax(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC,
                                    preferred_element_type=jnp.float32)


def _windows(x, kh, kw):
    b, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i:i + h, j:j + wd, :] for i in range(kh) for j in range(kw)]


def conv_im2col(x, w):
    kh, kw, cin, cout = w.shape
    cols = jnp.concatenate(_windows(x, kh, kw), axis=-1)
    return (cols.reshape(-1, kh * kw * cin) @ w.reshape(-1, cout)).reshape(*x.shape[:3], cout)


def conv_shifted(x, w):
    kh, kw, _, _ = w.shape
    taps = _windows(x, kh, kw)
    return sum(jnp.einsum("bhwc,cd->bhwd", t, w[k // kw, k % kw]) for k, t in enumerate(taps))


def input_grad(conv):
    return lambda x, w: jax.grad(lambda x_: jnp.sum(conv(x_, w) ** 2))(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    r = args.repeats
    print(f"3x3 stride-1 convolution, batch {args.batch}, NHWC, {jax.devices()[0].platform}; median ms of {r}")
    print("| H=W | C_in -> C_out | GFLOP | lax | im2col | shifted | lax bf16 | d/dx lax | d/dx im2col | lax GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hw, cin, cout in SHAPES:
        kx, kw_ = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (args.batch, hw, hw, cin), jnp.float32)
        w = jax.random.normal(kw_, (3, 3, cin, cout), jnp.float32) / np.sqrt(9 * cin)
        np.testing.assert_allclose(jax.jit(conv_im2col)(x, w), jax.jit(conv_lax)(x, w), rtol=2e-4, atol=2e-4)
        gflop = 2.0 * args.batch * hw * hw * 9 * cin * cout / 1e9
        t = {
            "lax": median_ms(conv_lax, x, w, repeats=r),
            "im2col": median_ms(conv_im2col, x, w, repeats=r),
            "shifted": median_ms(conv_shifted, x, w, repeats=r),
            "bf16": median_ms(conv_lax, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), repeats=r),
            "dx_lax": median_ms(input_grad(conv_lax), x, w, repeats=r),
            "dx_im2col": median_ms(input_grad(conv_im2col), x, w, repeats=r),
        }
        print(f"| {hw} | {cin} -> {cout} | {gflop:.2f} | {t['lax']:.1f} | {t['im2col']:.1f} | {t['shifted']:.1f} | "
              f"{t['bf16']:.1f} | {t['dx_lax']:.1f} | {t['dx_im2col']:.1f} | {gflop / t['lax'] * 1000:.0f} |")
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        ms = median_ms(lambda m: jnp.matmul(m, m, preferred_element_type=jnp.float32), a.astype(dtype), repeats=r)
        print(f"\n2048x2048 matmul, {jnp.dtype(dtype).name} inputs: {ms:.1f} ms, {2 * 2048**3 / ms / 1e6:.0f} GFLOP/s",
              end="")
    print()


if __name__ == "__main__":
    main()
