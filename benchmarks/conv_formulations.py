"""A 3x3 convolution written other ways than XLA's convolution op, timed against it (JAX only).

benchmarks/compare_convolutions.py shows that XLA's CPU convolutions are slower than PyTorch's
(oneDNN's), the filter gradients most. This script asks whether the same arithmetic written with
other XLA ops is faster in JAX: for each shape (a "SAME" 3x3 convolution of stride 1, NHWC
input, HWIO kernel, as small_cnn's and VGG-FACE's layers are), it times

forward (y = conv(x, w)):
- xla: `lax.conv_general_dilated`, what the models run;
- taps: 9 x C_in broadcast multiply-adds, which XLA fuses into one elementwise loop (only for
  C_in <= 4: a network's first convolution, whose input is the image);
- im2col: the 9 shifted windows concatenated on the channel axis, then one matrix product;
- 9dots: one matrix product per shifted window, summed;

filter gradient (dW = the vjp of conv with respect to w, for a cotangent dy):
- xla: as `jax.vjp` derives it (XLA transposes x and dy and runs a convolution over the batch);
- im2col: the patches' transpose times dy, one matrix product;
- 9dots: one product of a shifted window's transpose with dy per tap;
- split8: XLA's, over 8 slices of the batch, summed (independent convolutions that XLA may run
  side by side).

Each is jitted alone; a repeat times --calls calls of each in turn (medians over the repeats,
ms per call). In brackets: the largest difference from xla's result relative to its largest
magnitude (float32 rounding: about 1e-6).

--dtype bfloat16 gives every form bf16 operands. The xla forms then compute in bf16, as a bf16
model's convolutions do; the products (im2col, 9dots) return float32
(`preferred_element_type`), the one kind of bf16 product this jaxlib's CPU backend runs on the
CPU's BF16 units (YNNPACK); taps multiply-add in float32. Differences are then bf16's (~1e-2).

  python benchmarks/conv_formulations.py                           # the default shapes
  python benchmarks/conv_formulations.py --shapes 64x64x64x3x16 --repeats 3
  python benchmarks/conv_formulations.py --dtype bfloat16

A shape BxHxWxCxO is a batch of B HxW maps of C channels into O channels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fbnet_jax.core import runtime_defaults

# small_cnn's four layers at 64 px, batch 64 (compare_pytorch.py's case), and three of
# VGG-FACE's at 96 px, batch 16.
DEFAULT_SHAPES = ("64x64x64x3x16", "64x32x32x16x32", "64x16x16x32x64", "64x8x8x64x128",
                  "16x96x96x64x64", "16x48x48x128x128", "16x12x12x512x512")


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def product(a, b):
    """a @ b with a float32 result (bf16 operands: on the CPU's BF16 units)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def windows(x):
    """The 9 shifted windows of x padded by one, in the kernel's (row, column) order."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def patches(x):
    """[B*H*W, 9*C]: each position's 3x3 neighbourhood, the windows side by side (im2col)."""
    return jnp.concatenate(windows(x), axis=-1).reshape(-1, 9 * x.shape[-1])


def forward_taps(x, w):
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    out = 0
    for tap, window in enumerate(windows(x)):
        for c in range(x.shape[-1]):
            out = out + window[..., c:c + 1] * w[tap // 3, tap % 3, c]
    return out


def forward_im2col(x, w):
    b, h, ww, c = x.shape
    return product(patches(x), w.reshape(9 * c, -1)).reshape(b, h, ww, -1)


def forward_9dots(x, w):
    return sum(product(window, w[tap // 3, tap % 3]) for tap, window in enumerate(windows(x)))


def filter_grad_xla(x, dy):
    w = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]


def filter_grad_im2col(x, dy):
    c, o = x.shape[-1], dy.shape[-1]
    return product(patches(x).T, dy.reshape(-1, o)).reshape(3, 3, c, o)


def filter_grad_9dots(x, dy):
    c, o = x.shape[-1], dy.shape[-1]
    flat = dy.reshape(-1, o)
    return jnp.stack([product(window.reshape(-1, c).T, flat)
                      for window in windows(x)]).reshape(3, 3, c, o)


def filter_grad_split8(x, dy):
    return sum(filter_grad_xla(a, b) for a, b in zip(jnp.split(x, 8), jnp.split(dy, 8)))


FORWARD = {"xla": conv, "taps": forward_taps, "im2col": forward_im2col, "9dots": forward_9dots}
FILTER_GRAD = {"xla": filter_grad_xla, "im2col": filter_grad_im2col, "9dots": filter_grad_9dots,
               "split8": filter_grad_split8}


def parse_shape(text: str) -> tuple[int, ...]:
    """"BxHxWxCxO" -> (B, H, W, C, O); argparse reports a ValueError as a bad value."""
    shape = tuple(int(n) for n in text.split("x"))
    if len(shape) != 5 or min(shape) < 1:
        raise ValueError(text)
    return shape


def formulations(shape: tuple[int, ...]) -> dict:
    """{("fwd" | "dW", name): function of (x, w) or (x, dy)} that apply to this shape."""
    b, _, _, c, _ = shape
    ops = {("fwd", name): fn for name, fn in FORWARD.items() if name != "taps" or c <= 4}
    ops.update({("dW", name): fn for name, fn in FILTER_GRAD.items()
                if name != "split8" or b % 8 == 0})
    return ops


def time_shape(shape: tuple[int, ...], repeats: int, calls: int, dtype=jnp.float32,
               seed: int = 0) -> dict:
    """{(kind, name): (median ms per call, relative difference from xla's result)}."""
    b, h, w, c, o = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, o), np.float32) * 0.1, dtype)
    dy = jnp.asarray(rng.standard_normal((b, h, w, o), np.float32), dtype)
    runs, results = {}, {}
    for (kind, name), fn in formulations(shape).items():
        jitted, args = jax.jit(fn), (x, kernel) if kind == "fwd" else (x, dy)
        results[(kind, name)] = np.asarray(jitted(*args), np.float32)  # compiles
        runs[(kind, name)] = lambda jitted=jitted, args=args: jax.block_until_ready(jitted(*args))
    ms = interleaved_ms(runs, repeats, calls)
    out = {}
    for (kind, name), result in results.items():
        ref = results[(kind, "xla")]
        difference = float(np.abs(result - ref).max() / np.abs(ref).max())
        out[(kind, name)] = (ms[(kind, name)], difference)
    return out


def interleaved_ms(runs: dict, repeats: int, calls: int) -> dict:
    """{key: median ms per call} of each run (a function of no arguments), timed in turn:
    each of `repeats` rounds times `calls` calls of every run, so all share the machine's load
    of the moment."""
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[key].append((time.perf_counter() - start) / calls * 1e3)
    return {key: statistics.median(ms) for key, ms in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        metavar="BxHxWxCxO", help=f"default: {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per op")
    parser.add_argument("--calls", type=int, default=3, help="calls of an op per window")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the operands' dtype (bfloat16: see the module's docstring)")
    args = parser.parse_args()
    if min(args.repeats, args.calls) < 1:
        parser.error("--repeats and --calls must be >= 1")
    runtime_defaults.apply()  # the XLA flags, malloc and CPU dispatch training runs with
    shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    arithmetic = ("float32" if args.dtype == "float32" else "bf16 operands; xla in bf16, "
                  "products with float32 results, taps in float32")
    print(f"- jax {jax.__version__}, backend {jax.default_backend()}, {arithmetic}, "
          f"{len(os.sched_getaffinity(0))} cores; {args.repeats} repeats of {args.calls} calls "
          "of each op after one compiling call; ms per call (median), and in brackets the "
          "largest difference from xla's result relative to its largest magnitude")
    head = ["shape BxHxWxCxO", *(f"fwd {n}" for n in FORWARD), *(f"dW {n}" for n in FILTER_GRAD)]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for shape in shapes:
        ms = time_shape(shape, args.repeats, args.calls, jnp.dtype(args.dtype))
        cells = ["x".join(map(str, shape))]
        for kind, names in (("fwd", FORWARD), ("dW", FILTER_GRAD)):
            for name in names:
                if (kind, name) not in ms:
                    cells.append("-")
                    continue
                t, diff = ms[(kind, name)]
                cells.append(f"{t:.2f}" if name == "xla" else f"{t:.2f} ({diff:.0e})")
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n- load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
