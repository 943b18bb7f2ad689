"""benchmarks/conv_formulations.py: every formulation computes the convolution (or its filter
gradient) that numpy computes directly, and the script runs from its command line."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_benchmark


formulations = load_benchmark("conv_formulations")


def _numpy_conv(x, w):
    """A "SAME" 3x3 convolution of stride 1 (cross-correlation, as XLA's and PyTorch's)."""
    b, h, ww, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    out = np.zeros((b, h, ww, w.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i:i + h, j:j + ww] @ w[i, j]
    return out


def _numpy_filter_grad(x, dy):
    h, ww = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    return np.stack([[np.einsum("bhwc,bhwo->co", padded[:, i:i + h, j:j + ww], dy)
                      for j in range(3)] for i in range(3)])


@pytest.mark.parametrize("shape", [(8, 5, 7, 3, 4), (2, 6, 4, 5, 3)])
def test_each_formulation_computes_the_convolution(shape):
    b, h, w, c, o = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, c, o)).astype(np.float32)
    dy = rng.standard_normal((b, h, w, o)).astype(np.float32)
    ops = formulations.formulations(shape)
    expected = {"fwd": _numpy_conv(x, kernel), "dW": _numpy_filter_grad(x, dy)}
    for (kind, name), fn in ops.items():
        got = np.asarray(fn(x, kernel if kind == "fwd" else dy))
        np.testing.assert_allclose(got, expected[kind], rtol=1e-4, atol=1e-4,
                                   err_msg=f"{kind} {name}")
    # The image-only and batch-split forms are offered only where they apply.
    assert (("fwd", "taps") in ops) == (c <= 4)
    assert (("dW", "split8") in ops) == (b % 8 == 0)
    assert len(ops) == 3 + (c <= 4) + 3 + (b % 8 == 0)


def test_command_line_prints_a_row_per_shape_and_refuses_a_bad_shape():
    script = str(REPO / "benchmarks" / "conv_formulations.py")
    run = subprocess.run([sys.executable, script, "--shapes", "8x6x6x3x4", "2x4x4x8x8",
                          "--repeats", "1", "--calls", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "x" in line
            and "shape" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 8x6x6x3x4", "| 2x4x4x8x8"]
    # 8 columns of times; "-" where a form does not apply (taps: C > 4; split8: B not / 8).
    assert [row.count(" - ") for row in rows] == [0, 2]
    bad = subprocess.run([sys.executable, script, "--shapes", "8x6x6x3"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2
    assert "invalid parse_shape value: '8x6x6x3'" in bad.stderr


def test_bfloat16_operands_give_float32_products_close_to_the_convolution():
    shape = (8, 5, 7, 3, 4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape[:4]).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(shape[:3] + (4,)).astype(np.float32)
    expected = {"fwd": _numpy_conv(x, kernel), "dW": _numpy_filter_grad(x, dy)}
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, kernel, dy)]
    for (kind, name), fn in formulations.formulations(shape).items():
        got = fn(bf16[0], bf16[1] if kind == "fwd" else bf16[2])
        # XLA's own keeps the operands' dtype; every other form returns float32.
        assert got.dtype == (jnp.bfloat16 if name in ("xla", "split8") else jnp.float32), name
        scale = np.abs(expected[kind]).max()
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale, expected[kind] / scale,
                                   atol=2e-2, err_msg=f"{kind} {name}")
    timed = formulations.time_shape(shape, 1, 1, jnp.bfloat16)
    assert set(timed) == set(formulations.formulations(shape))
    assert all(0 <= difference < 2e-2 for _, difference in timed.values())
