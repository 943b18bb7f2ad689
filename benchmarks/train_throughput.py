"""Train-step throughput of FaceBehaviorNet, on whatever devices JAX sees.

Times the real jitted train step (fbnet_jax.train.step.make_train_step, all three task losses) on a
device-resident batch, so the numbers are the model's, not the input pipeline's (see
benchmarks/input_pipeline.py for that). Prints one table row per case and input:

  python benchmarks/train_throughput.py                       # CPU-sized cases
  python benchmarks/train_throughput.py --inputs float uint8 augment   # side by side

Inputs ("input" column): `float`, the float32 model input itself (the bare step); `uint8`, uint8
faces as the pipeline delivers them, normalised in the step; `augment`, uint8 faces augmented
(the config's data.augment: flip, zoom, shift, brightness, contrast) and normalised in the step,
which is what `fbnet train` runs.
  python benchmarks/train_throughput.py --cases gpu           # TF32 float32 rows on NVIDIA
  python benchmarks/train_throughput.py --cases gpu --matmul_precision highest  # true FP32

Columns: examples/s, ms per step, compile seconds, model TFLOP per step (XLA's cost analysis of
the step lowered for the CPU), achieved TFLOP/s, and the arithmetic the backbone's convolutions
and matrix products ran in ("matmul"): bfloat16 and float16 rows run in bf16 and fp16; float32
rows run at --matmul_precision (jax_default_matmul_precision), which on NVIDIA GPUs (Ampere and
newer) means TF32 on the tensor cores for "default" and "high" and true FP32 only for "highest";
on the CPU float32 is float32 at every setting. The heads and losses stay float32 in every row.

MFU is achieved TFLOP/s over the dense peak of that arithmetic on the device (PEAK_TFLOPS, from
the vendor's datasheet; known devices only, none for the CPU), or over --peak_tflops for every
row when given. The peak used is printed beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from pathlib import Path

import jax
import numpy as np

from data_pipelines import device_augment
from fbnet_jax.runtime import parallel
from fbnet_jax.core import runtime_defaults
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) peak TFLOP/s per device kind and arithmetic, from the vendor's datasheet.
# NVIDIA H200 SXM ("NVIDIA H200"; the H200 NVL is slower and is not listed): its 989 TFLOP/s
# TF32 figure is with 2:4 sparsity, 494.7 dense (likewise bf16 and fp16: 1979 sparse, 989.4
# dense); FP32 is the CUDA cores' rate.
PEAK_TFLOPS = {
    "NVIDIA H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
}

# (backbone, image size, global batch, dtype)
CASES = {
    "cpu": [("small_cnn", 48, 64, "float32"), ("small_cnn", 64, 64, "float32"),
            ("small_cnn", 96, 64, "float32"),
            ("vgg_face", 96, 16, "float32")],
    "gpu": [("small_cnn", 64, 256, "float32"), ("small_cnn", 64, 256, "bfloat16"),
            ("vgg_face", 112, 256, "float32"), ("vgg_face", 112, 256, "bfloat16"),
            ("vgg_face", 96, 512, "bfloat16")],
    # benchmarks/gpu.sh: the paper's backbones in bfloat16 at batches that fill one large GPU.
    "gpu_mfu": [("vgg_face", 112, 256, "bfloat16"), ("vgg_face", 112, 512, "bfloat16"),
                ("resnet50", 112, 256, "bfloat16"), ("resnet50", 224, 256, "bfloat16")],
}


def names(text: str, known, what: str) -> list[str]:
    """A comma-separated list of `known` names; a clear error for anything else."""
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise SystemExit(f"--{what} {text!r}: unknown {', '.join(unknown) or '(empty)'}; "
                         f"known: {', '.join(known)}")
    return chosen


def cpu_model() -> str:
    """The CPU's model name (for the machine line of a benchmark's table)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_arithmetic(device, dtype: str, precision: str) -> str:
    """What the backbone's convolutions and matrix products compute in, for the table."""
    if dtype in ("bfloat16", "float16"):
        return {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    if dtype != "float32":
        return dtype
    if device.platform == "cpu":
        return "fp32"  # XLA's CPU backend ignores the precision setting
    if device.platform == "gpu" and "nvidia" in device.device_kind.lower():
        # NVIDIA from Ampere on: DEFAULT and HIGH allow TF32 tensor-core arithmetic.
        return "fp32" if precision == "highest" else "tf32"
    return f"f32@{precision}"  # other backends: the setting's meaning is theirs


def load_config():
    spec = importlib.util.spec_from_file_location("synthetic_config",
                                                  REPO / "configs" / "synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


INPUTS = ("float", "uint8", "augment")


def random_batch(batch_size: int, image_size: int, num_aus: int, rng: np.random.Generator,
                 input_kind: str = "float"):
    """A fully labelled batch of the training layout (values do not matter for timing)."""
    shape = (batch_size, image_size, image_size, 3)
    image = (rng.uniform(-1, 1, shape).astype(np.float32) if input_kind == "float"
             else rng.integers(0, 256, shape).astype(np.uint8))
    return {
        "image": image, "row": np.arange(batch_size, dtype=np.int32),
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


def bench(backbone: str, image_size: int, batch_size: int, dtype: str, steps: int,
          input_kind: str = "float"):
    config = load_config()
    config.model.backbone = backbone
    config.model.dtype = dtype
    config.data.image_size = image_size
    config.data.global_batch_size = batch_size
    mesh = parallel.create_mesh()
    model, tx, _, state = state_lib.create_state(config, mesh)
    augment = (device_augment.DeviceAugment.from_config(config.data.augment)
               if input_kind == "augment" else None)
    step_fn = jax.jit(train.make_train_step(model, tx, config.loss.weights, augment=augment,
                                            seed=config.seed), donate_argnums=0)
    batch = parallel.global_batch(
        random_batch(batch_size, image_size, len(config.data.aus), np.random.default_rng(0),
                     input_kind), mesh)
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
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=["float"],
                        help="the batch the step gets: float32 model input (the bare step), "
                             "uint8 faces normalised in the step, or uint8 faces augmented and "
                             "normalised in the step (what fbnet train runs)")
    parser.add_argument("--backbones", default="",
                        help="comma-separated: only the rows of these backbones (default: all)")
    parser.add_argument("--matmul_precision", choices=("default", "high", "highest"),
                        default="default",
                        help="jax_default_matmul_precision for float32 convolutions and matrix "
                             "products: on NVIDIA GPUs default and high are TF32, highest is "
                             "true FP32; no effect on the CPU or on bfloat16 rows' backbone")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="peak device TFLOP/s for the MFU column of every row (0: the dense "
                             "datasheet peak of each row's arithmetic on known devices, "
                             "no MFU elsewhere)")
    args = parser.parse_args()
    runtime_defaults.apply()  # the XLA flags, malloc and CPU dispatch `fbnet train` runs with
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    device = jax.devices()[0]
    peaks = PEAK_TFLOPS.get(device.device_kind, {})
    print(f"devices: {jax.device_count()} x {device.device_kind}; jax {jax.__version__}; "
          f"matmul precision {args.matmul_precision}")
    header = (f"{'backbone':<10} {'size':>4} {'batch':>5} {'dtype':<8} {'input':<7} {'matmul':<6}"
              f" {'ex/s':>9} {'ms/step':>8} {'compile s':>9} {'TFLOP/step':>10} {'TFLOP/s':>8}"
              f" {'peak':>6} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    known = sorted({row[0] for row in CASES[args.cases]})
    only = names(args.backbones, known, "backbones") if args.backbones else known
    for backbone, size, batch, dtype in CASES[args.cases]:
        if backbone not in only:
            continue
        for input_kind in args.inputs:
            ex_s, ms, compile_s, tflop = bench(backbone, size, batch, dtype, args.steps,
                                               input_kind)
            achieved = tflop / (ms / 1e3)
            arithmetic = matmul_arithmetic(device, dtype, args.matmul_precision)
            peak = args.peak_tflops or peaks.get(arithmetic, 0.0)
            peak_s = f"{peak:6.1f}" if peak else f"{'-':>6}"
            mfu = f"{achieved / peak:6.1%}" if peak else f"{'-':>6}"
            print(f"{backbone:<10} {size:>4} {batch:>5} {dtype:<8} {input_kind:<7} "
                  f"{arithmetic:<6} {ex_s:9.1f} {ms:8.1f} {compile_s:9.1f} {tflop:10.4f} "
                  f"{achieved:8.2f} {peak_s} {mfu}", flush=True)


if __name__ == "__main__":
    main()
