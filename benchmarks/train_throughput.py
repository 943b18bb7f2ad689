"""Train-step throughput of FaceBehaviorNet, on whatever devices JAX sees.

Times the real jitted train step (fbnet_jax.train.make_train_step, all three task losses) on a
device-resident batch, so the numbers are the model's, not the input pipeline's (see
benchmarks/input_pipeline.py for that). Prints one table row per case:

  python benchmarks/train_throughput.py                       # CPU-sized cases
  python benchmarks/train_throughput.py --cases gpu --peak_tflops 989

Columns: examples/s, ms per step, compile seconds, model TFLOP per step (XLA's cost analysis of
the step lowered for the CPU),
achieved TFLOP/s and, with --peak_tflops, model FLOPs utilisation (MFU).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import numpy as np

from fbnet_jax import parallel, train
from fbnet_jax import state as state_lib

REPO = Path(__file__).resolve().parents[1]

# (backbone, image size, global batch, dtype)
CASES = {
    "cpu": [("small_cnn", 64, 64, "float32"), ("small_cnn", 96, 64, "float32"),
            ("vgg_face", 96, 16, "float32")],
    "gpu": [("small_cnn", 64, 256, "float32"), ("small_cnn", 64, 256, "bfloat16"),
            ("vgg_face", 112, 256, "float32"), ("vgg_face", 112, 256, "bfloat16"),
            ("vgg_face", 96, 512, "bfloat16")],
}


def load_config():
    spec = importlib.util.spec_from_file_location("synthetic_config",
                                                  REPO / "configs" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def random_batch(batch_size: int, image_size: int, num_aus: int, rng: np.random.Generator):
    """A fully labelled batch of the training layout (values do not matter for timing)."""
    return {
        "image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
        "expression": rng.integers(0, 7, batch_size).astype(np.int32),
        "expression_mask": np.ones(batch_size, np.float32),
        "au": rng.integers(0, 2, (batch_size, num_aus)).astype(np.float32),
        "au_mask": np.ones((batch_size, num_aus), np.float32),
        "va": rng.uniform(-1, 1, (batch_size, 2)).astype(np.float32),
        "va_mask": np.ones(batch_size, np.float32),
    }


def model_flops(step_fn, state, batch) -> float:
    """FLOPs of one train step, from XLA's cost analysis of the step lowered for the CPU.

    The HLO is counted before backend optimisation and on the CPU lowering because on GPUs the
    convolutions become cuDNN custom calls that the cost analysis does not count; the model's
    arithmetic is the same on every backend.
    """
    # Shapes only: the arguments' shardings name this backend's devices.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
    cost = step_fn.trace(*abstract).lower(lowering_platforms=("cpu",)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench(backbone: str, image_size: int, batch_size: int, dtype: str, steps: int):
    config = load_config()
    config.model.backbone = backbone
    config.model.dtype = dtype
    config.data.image_size = image_size
    config.data.global_batch_size = batch_size
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(config, mesh)
    step_fn = jax.jit(train.make_train_step(model, tx, config.loss.weights), donate_argnums=0)
    batch = parallel.global_batch(
        random_batch(batch_size, image_size, len(config.data.aus), np.random.default_rng(0)), mesh)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = model_flops(step_fn, state, batch)
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return batch_size / seconds, seconds * 1e3, compile_s, flops / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", choices=sorted(CASES), default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak device TFLOP/s for the MFU column (0: no MFU)")
    args = parser.parse_args()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    header = (f"{'backbone':<10} {'size':>4} {'batch':>5} {'dtype':<8} {'ex/s':>9} {'ms/step':>8}"
              f" {'compile s':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    for backbone, size, batch, dtype in CASES[args.cases]:
        ex_s, ms, compile_s, tflop = bench(backbone, size, batch, dtype, args.steps)
        achieved = tflop / (ms / 1e3)
        mfu = f"{achieved / args.peak_tflops:6.1%}" if args.peak_tflops else f"{'-':>6}"
        print(f"{backbone:<10} {size:>4} {batch:>5} {dtype:<8} {ex_s:9.1f} {ms:8.1f} "
              f"{compile_s:9.1f} {tflop:10.4f} {achieved:8.2f} {mfu}", flush=True)


if __name__ == "__main__":
    main()
