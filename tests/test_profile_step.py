"""benchmarks/profile_step.py: the FLOPs it gives each traced op are those of the formula.

The benchmark's account of the step ("where the time goes") divides these counts by the traced times;
a wrong count (stride, kernel size, which dimension is C_out) would make its GFLOP/s column wrong.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_step  # noqa: E402


def _program(x, w1, w2, m):
    nhwc = ("NHWC", "HWIO", "NHWC")
    y = jax.nn.relu(lax.conv_general_dilated(x, w1, (1, 1), ((1, 1), (1, 1)), dimension_numbers=nhwc))
    z = lax.conv_general_dilated(y, w2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=nhwc)
    return z.reshape(z.shape[0], -1) @ m


def test_profile_counts_each_ops_flops_by_the_formula():
    b, h, cin, c1, c2, classes = 2, 8, 3, 5, 7, 4
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s).astype(np.float32))
            for s in [(b, h, h, cin), (3, 3, cin, c1), (3, 3, c1, c2), ((h // 2) ** 2 * c2, classes)]]
    compiled = jax.jit(_program).lower(*args).compile()
    rows, program_ms = profile_step.profile_compiled(compiled, lambda: jax.block_until_ready(compiled(*args)), 2)
    flops = {label: f for label, _, _, f in rows if f}
    # Each count from its own formula: 2 * output pixels * C_out * (kernel taps * C_in), and 2 * M * N * K.
    first = 2 * b * h * h * c1 * 9 * cin
    second = 2 * b * (h // 2) ** 2 * c2 * 9 * c1
    dot = 2 * b * classes * (h // 2) ** 2 * c2
    expected = {
        f"conv 3x3 {h}x{h} {cin}->{c1}, forward": first,
        f"conv 3x3 {h // 2}x{h // 2} {c1}->{c2} stride 2x2, forward": second,
    }
    found = dict(flops)
    for label, value in expected.items():
        # The op may be fused with others (XLA decides), so look the conv's label up inside the row's label.
        row = next((lab for lab in found if label in lab), None)
        assert row is not None, (label, list(found))
        assert found[row] >= value
    assert sum(found.values()) == first + second + dot
    assert program_ms > 0
