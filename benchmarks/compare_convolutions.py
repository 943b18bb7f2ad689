"""Each convolution of a backbone alone: XLA's CPU kernels against PyTorch's, side by side.

benchmarks/compare_pytorch.py times whole train steps; this script says which convolutions make
the difference. For every distinct convolution of a case's backbone (the cases of
compare_pytorch.py: same image size and batch), read from the jaxpr of the model's forward pass,
it times the three convolutions a train step runs:

- fwd: the convolution itself;
- dx: its input gradient, as jax.vjp derives it (none for the network's first convolution, whose
  input is the image: the train step does not compute it either);
- dW: its filter gradient, likewise;

each jitted alone in JAX, with `fbnet`'s XLA flags (`runtime_defaults.apply()`), and in PyTorch as
F.conv2d and torch.ops.aten.convolution_backward compute them on channels_last tensors (oneDNN's
kernels, as compare_pytorch.py's PyTorch step uses them). Each repeat times --calls calls of each
of the six in turn, so both sides share the machine's load of the moment; the table gives medians
over the repeats in milliseconds per call. "all" sums fwd, dx and dW; the last line of a case
sums every convolution of the network (each distinct one times its count).

  python benchmarks/compare_convolutions.py                        # small_cnn and vgg_face_96
  python benchmarks/compare_convolutions.py --cases resnet50 --repeats 3

Float32 throughout (XLA's CPU convolutions ignore the matmul precision setting; torch
float32_matmul_precision highest). Needs PyTorch: pip install -e .[bench].
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from fbnet_jax.core import runtime_defaults
from fbnet_jax.runtime import state as state_lib

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
import compare_pytorch  # noqa: E402  pylint: disable=wrong-import-position
import conv_formulations  # noqa: E402  pylint: disable=wrong-import-position

torch = compare_pytorch.torch
F = compare_pytorch.F

DEFAULT_CASES = ("small_cnn", "vgg_face_96")


def convolutions(backbone: str, image_size: int, batch_size: int) -> list[dict]:
    """The distinct convolutions of the model's forward pass in training, in order, with counts.

    Each is a dict of the input shape (NHWC), the kernel shape (HWIO), strides, padding, and
    whether it is the network's first (its input is the image, so no input gradient is needed).
    """
    config = compare_pytorch.config_for(backbone, image_size, batch_size, "float32")
    model = state_lib.model_for(config)
    images = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}))(
            variables, images)
    found = []
    _collect(jaxpr.jaxpr, found)
    counts = Counter(found)  # keeps the order in which each convolution first appears
    return [{"input": lhs, "kernel": rhs, "strides": strides, "padding": padding,
             "count": count, "first": i == 0}
            for i, ((lhs, rhs, strides, padding), count) in enumerate(counts.items())]


def _collect(jaxpr, found: list) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            p = eqn.params
            lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
            spec = tuple(tuple(d) for d in p["dimension_numbers"])
            if (spec != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)) or p["feature_group_count"] != 1
                    or p["batch_group_count"] != 1 or set(p["lhs_dilation"]) != {1}
                    or set(p["rhs_dilation"]) != {1}):
                raise ValueError(f"not an NHWC/HWIO convolution of the kind this script times: "
                                 f"{eqn}")
            found.append((lhs, rhs, tuple(p["window_strides"]),
                          tuple(tuple(pad) for pad in p["padding"])))
        for sub in jax_core.jaxprs_in_params(eqn.params):
            _collect(sub, found)


def jax_ops(conv: dict, rng: np.random.Generator):
    """{"fwd", "dx", "dW"} -> (jitted fn, args), and the arrays, for one convolution."""
    x = jnp.asarray(rng.standard_normal(conv["input"], np.float32))
    w = jnp.asarray(rng.standard_normal(conv["kernel"], np.float32) * 0.1)

    def apply(x, w):
        return jax.lax.conv_general_dilated(x, w, conv["strides"], conv["padding"],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y = apply(x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    ops = {"fwd": (jax.jit(apply), (x, w)),
           "dW": (jax.jit(lambda x, dy: jax.vjp(lambda w: apply(x, w), w)[1](dy)[0]), (x, dy))}
    if not conv["first"]:
        ops["dx"] = (jax.jit(lambda w, dy: jax.vjp(lambda x: apply(x, w), x)[1](dy)[0]), (w, dy))
    return ops, (x, w, dy)


def torch_ops(conv: dict, x, w, dy):
    """The same three on channels_last torch tensors; the results as NHWC / HWIO arrays."""
    pads = conv["padding"]
    if any(low != high for low, high in pads):
        raise ValueError(f"asymmetric padding {pads}: F.conv2d pads both sides alike")
    stride, padding = conv["strides"], tuple(low for low, _ in pads)
    cl = torch.channels_last
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    tdy = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous(memory_format=cl)

    def backward(which):
        mask = (which == "dx", which == "dW", False)
        return lambda: torch.ops.aten.convolution_backward(
            tdy, tx, tw, None, stride, padding, (1, 1), False, (0, 0), 1, mask)

    def fwd():
        with torch.no_grad():
            return F.conv2d(tx, tw, stride=stride, padding=padding)
    ops = {"fwd": fwd, "dW": backward("dW")}
    if not conv["first"]:
        ops["dx"] = backward("dx")
    return ops


def torch_result(which: str, out) -> np.ndarray:
    """A torch op's output in the JAX layout (NHWC, or HWIO for a filter gradient)."""
    if which != "fwd":
        out = out[0] if which == "dx" else out[1]
    return out.permute((2, 3, 1, 0) if which == "dW" else (0, 2, 3, 1)).numpy()


def time_convolution(conv: dict, repeats: int, calls: int, seed: int = 0) -> dict:
    """Median ms per call of each op, JAX and PyTorch, interleaved."""
    jops, arrays = jax_ops(conv, np.random.default_rng(seed))
    tops = torch_ops(conv, *arrays)
    runs = {}
    for which, (fn, args) in jops.items():
        runs[("jax", which)] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        runs[("torch", which)] = tops[which]
    for run in runs.values():  # compile, warm up
        run()
        run()
    return conv_formulations.interleaved_ms(runs, repeats, calls)


def describe(conv: dict) -> str:
    n, h, w, c = conv["input"]
    kh, kw, _, o = conv["kernel"]
    stride = "" if set(conv["strides"]) == {1} else f" /{conv['strides'][0]}"
    return f"{n}x{h}x{w}x{c} * {kh}x{kw}x{c}x{o}{stride}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(compare_pytorch.CASES),
                        default=list(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per op")
    parser.add_argument("--calls", type=int, default=3, help="calls of an op per window")
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch.set_num_threads (0: the cores this process may use)")
    args = parser.parse_args()
    if min(args.repeats, args.calls) < 1 or args.torch_threads < 0:
        parser.error("--repeats and --calls must be >= 1, --torch_threads >= 0")
    malloc = runtime_defaults.apply()  # the XLA flags, malloc and CPU dispatch of `fbnet`
    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    args.dtype = "float32"
    compare_pytorch.print_header(args, malloc, timing=f"{args.repeats} repeats of {args.calls} "
                                 "calls of each op, after 2 warm-up calls")
    print("- ops: ms per call, median of the repeats; dx is not computed for a network's first "
          "convolution (its input is the image)")
    head = ("case", "convolution (input * kernel)", "count", "JAX fwd", "PyTorch fwd", "JAX dx",
            "PyTorch dx", "JAX dW", "PyTorch dW", "JAX all", "PyTorch all", "JAX/PyTorch time")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for name in args.cases:
        backbone, size, batch = compare_pytorch.CASES[name]
        totals = {"jax": 0.0, "torch": 0.0}
        for conv in convolutions(backbone, size, batch):
            ms = time_convolution(conv, args.repeats, args.calls)
            cells = [name, describe(conv), conv["count"]]
            for which in ("fwd", "dx", "dW"):
                cells += [f"{ms[(side, which)]:.2f}" if (side, which) in ms else "-"
                          for side in ("jax", "torch")]
            all_ms = {side: sum(v for (s, _), v in ms.items() if s == side)
                      for side in totals}
            for side in totals:
                totals[side] += conv["count"] * all_ms[side]
            cells += [f"{all_ms['jax']:.2f}", f"{all_ms['torch']:.2f}",
                      f"{all_ms['jax'] / all_ms['torch']:.2f}"]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        print(f"| {name} | every convolution, x count | | | | | | | | {totals['jax']:.1f} | "
              f"{totals['torch']:.1f} | {totals['jax'] / totals['torch']:.2f} |", flush=True)
    print(f"\n- load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
