"""A 3x3 convolution's forward and input gradient on XLA:CPU: ``lax.conv`` against GEMM forms, f32 and bf16.

    python benchmarks/conv_forms.py [--batch 64] [--repeats 10]

For the 3x3 stride-1 layer shapes of resnet32x4/resnet8x4 on 32x32 inputs (NHWC), the median time of
each jitted program over ``--repeats`` calls after a warm-up:

* ``lax``: XLA's own convolution (what jaxkd's models use for the forward pass and the input gradient);
* ``im2col``: the 9 shifted input windows concatenated along channels, then one matrix product;
* ``shifted``: the sum of 9 matrix products of the shifted windows with each tap's ``[C_in, C_out]`` slice;
* ``winograd``: Winograd's F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
  Networks", 2016): 2.25x fewer multiplications, as 16 matrix products ``[B·H·W/4, C_in] x [C_in, C_out]``
  between an input and an output transform; ``wino GEMMs`` times those 16 products alone;
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


def _winograd_input(x):
    """``Bᵀ d B`` of every 4x4 input tile (stride 2, pad 1): ``[16, B·H·W/4, C]``."""
    b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def transform(a, axis, n):  # rows of Bᵀ = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]
        r = [lax.slice_in_dim(a, k, k + 2 * n - 1, 2, axis) for k in range(4)]
        return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]

    tiles = [t for rows in transform(xp, 1, h // 2) for t in transform(rows, 2, wd // 2)]
    return jnp.stack(tiles).reshape(16, b * (h // 2) * (wd // 2), c)


def _winograd_kernel(w):
    """``G g Gᵀ`` per (C_in, C_out): ``[16, C_in, C_out]``; G = [[1,0,0], [½,½,½], [½,-½,½], [0,0,1]]."""
    def transform(g):
        return [g[0], (g[0] + g[1] + g[2]) / 2, (g[0] - g[1] + g[2]) / 2, g[2]]

    return jnp.stack([u for rows in transform(w) for u in transform(rows)])


def conv_winograd(x, w):
    b, h, wd, _ = x.shape
    m = jnp.einsum("tnc,tcd->tnd", _winograd_input(x), _winograd_kernel(w))
    m = m.reshape(4, 4, b, h // 2, wd // 2, -1)
    out = [[r[0] + r[1] + r[2], r[1] - r[2] - r[3]] for r in (m[0] + m[1] + m[2], m[1] - m[2] - m[3])]  # Aᵀ M A
    y = jnp.stack([jnp.stack(row, axis=-2) for row in out], axis=-3)  # [B, H/2, W/2, 2, 2, C_out]
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


def input_grad(conv):
    return lambda x, w: jax.grad(lambda x_: jnp.sum(conv(x_, w) ** 2))(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    r = args.repeats
    print(f"3x3 stride-1 convolution, batch {args.batch}, NHWC, {jax.devices()[0].platform}; median ms of {r}")
    print("| H=W | C_in -> C_out | GFLOP | lax | im2col | shifted | winograd | wino GEMMs | lax bf16 | d/dx lax "
          "| d/dx im2col | lax GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for hw, cin, cout in SHAPES:
        kx, kw_ = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (args.batch, hw, hw, cin), jnp.float32)
        w = jax.random.normal(kw_, (3, 3, cin, cout), jnp.float32) / np.sqrt(9 * cin)
        for form in (conv_im2col, conv_winograd):
            np.testing.assert_allclose(jax.jit(form)(x, w), jax.jit(conv_lax)(x, w), rtol=2e-4, atol=2e-4)
        tiles, kernel = _winograd_input(x), _winograd_kernel(w)
        gflop = 2.0 * args.batch * hw * hw * 9 * cin * cout / 1e9
        t = {
            "lax": median_ms(conv_lax, x, w, repeats=r),
            "im2col": median_ms(conv_im2col, x, w, repeats=r),
            "shifted": median_ms(conv_shifted, x, w, repeats=r),
            "winograd": median_ms(conv_winograd, x, w, repeats=r),
            "wino_gemm": median_ms(lambda v, u: jnp.einsum("tnc,tcd->tnd", v, u), tiles, kernel, repeats=r),
            "bf16": median_ms(conv_lax, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), repeats=r),
            "dx_lax": median_ms(input_grad(conv_lax), x, w, repeats=r),
            "dx_im2col": median_ms(input_grad(conv_im2col), x, w, repeats=r),
        }
        print(f"| {hw} | {cin} -> {cout} | {gflop:.2f} | {t['lax']:.1f} | {t['im2col']:.1f} | {t['shifted']:.1f} | "
              f"{t['winograd']:.1f} | {t['wino_gemm']:.1f} | {t['bf16']:.1f} | {t['dx_lax']:.1f} | {t['dx_im2col']:.1f} | {gflop / t['lax'] * 1000:.0f} |")
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        ms = median_ms(lambda m: jnp.matmul(m, m, preferred_element_type=jnp.float32), a.astype(dtype), repeats=r)
        print(f"\n2048x2048 matmul, {jnp.dtype(dtype).name} inputs: {ms:.1f} ms, {2 * 2048**3 / ms / 1e6:.0f} GFLOP/s",
              end="")
    print()


if __name__ == "__main__":
    main()
