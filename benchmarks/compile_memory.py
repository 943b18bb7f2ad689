"""Compile time and per-device memory of the train step, per backbone and dtype.

For each backbone and dtype, builds the train step as training builds its default (jit) step:
fbnet_jax.train.step.make_train_step with the config's loss weights and coupling losses, under
`jax.jit` with the state donated and replicated outputs. It lowers and compiles the step for a
batch of `--batch_size` examples per device and prints one markdown table:

  python benchmarks/compile_memory.py                         # every backbone, float32 and bf16
  python benchmarks/compile_memory.py --backbones small_cnn --dtypes float32 --batch_size 64

Columns: parameters (millions); the seconds of `lower` (tracing to StableHLO) and of `compile`
(XLA) and their sum, as medians over `--repeats` compilations (the sum's range in brackets);
then the per-device sizes from XLA's memory analysis of the compiled step, the numbers that
fbnet_jax.train.profiling.memory_line logs at the start of a run, in MiB: arguments (state and
batch), outputs (new state and metrics; the donated part reuses the arguments' buffers), temporaries
(activations kept for the backward pass, gradients, scratch) and generated code (XLA's CPU
backend reports 0 for it).

Nothing is executed and no data is read: the state and the batch are shapes only
(`create_state(..., abstract=True)` and the batch layout of data_pipelines/schema.py), which is
all lowering needs. Every compilation is fresh: the persistent compilation cache is switched off
and JAX's in-memory caches are cleared before each one.

The backbones' configs (the image size defaults to theirs):
  small_cnn  configs/synthetic.py            (64 px; expression, AU and VA losses)
  vgg_face   configs/paper_vgg.py:synthetic  (112 px; the paper's five loss terms)
  resnet50   configs/paper_vgg.py:synthetic with `model.backbone = "resnet50"` (112 px)

Memory depends on the backend: XLA's CPU, GPU and TPU compilers fuse, lay out and schedule
differently (and on the CPU bfloat16 arithmetic is emulated: converted to float32 and back), so
numbers measured on one backend do not carry over to another.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jaxlib
import numpy as np

from data_pipelines import schema
from fbnet_jax.core import config_files, runtime_defaults
from fbnet_jax.runtime import parallel
from fbnet_jax.train import loop as train
from fbnet_jax.runtime import state as state_lib
from fbnet_jax.model import DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling train_throughput.py
import train_throughput  # noqa: E402  pylint: disable=wrong-import-position

REPO = Path(__file__).resolve().parents[1]

# backbone -> the config its step is built from (which also gives the default image size).
CONFIGS = {
    "small_cnn": "configs/synthetic.py",
    "vgg_face": "configs/paper_vgg.py:synthetic",
    "resnet50": "configs/paper_vgg.py:synthetic",
}

MIB = 2**20


def load_config(backbone: str, dtype: str, image_size: int | None, batch_size: int):
    """The backbone's config with the dtype, image size and global batch of this case."""
    config = config_files.load(str(REPO / CONFIGS[backbone]))
    config.model.backbone = backbone
    config.model.dtype = dtype
    if image_size:
        config.data.image_size = image_size
    config.data.global_batch_size = batch_size
    return config


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch, sharded over the mesh like a real one.

    Derived from the schema (one record through `to_masks`, the pipeline's last transform) so
    that it follows the batch layout the pipeline produces; the image is float32 after the
    pipeline's normalisation. Host-only fields (the example key) are left out, as
    `parallel.global_batch` does.
    """
    size = config.data.image_size
    record = schema.make_record(np.zeros((size, size, 3), np.uint8), key="",
                                num_aus=len(config.data.aus))
    example = schema.to_masks(record)
    example[schema.IMAGE] = example[schema.IMAGE].astype(np.float32)
    sharding = parallel.data_sharding(mesh)
    batch = config.data.global_batch_size
    return {name: jax.ShapeDtypeStruct((batch, *np.shape(value)), np.asarray(value).dtype,
                                       sharding=sharding)
            for name, value in example.items() if parallel.is_device_field(value)}


def compile_step(config, mesh):
    """Lowers and compiles the train step of `config` from shapes alone.

    Returns:
      (parameter count, lower seconds, compile seconds, the compiled step).
    """
    model, tx, _, state = state_lib.create_state(config, mesh, abstract=True)
    batch = abstract_batch(config, mesh)
    step = train.make_train_step(model, tx, config.loss.weights, train.coupling_for(config))
    jitted = jax.jit(step, donate_argnums=0,
                     out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
    jax.clear_caches()  # a repeat of a case must compile again, not hit the in-memory cache
    start = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return num_params, lowered_at - start, done - lowered_at, compiled


def memory_mib(compiled) -> dict[str, float] | None:
    """Per-device MiB of XLA's memory analysis of `compiled` (None on backends without one)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if stats is None:
        return None
    return {
        "arguments": stats.argument_size_in_bytes / MIB,
        "outputs": stats.output_size_in_bytes / MIB,
        "donated": stats.alias_size_in_bytes / MIB,
        "temporaries": stats.temp_size_in_bytes / MIB,
        "code": stats.generated_code_size_in_bytes / MIB,
    }


def measure(backbone: str, dtype: str, image_size: int | None, batch_size: int, repeats: int,
            mesh) -> dict:
    """One table row: the median lower and compile seconds over `repeats` fresh compilations
    (and the range of their sums), and the memory analysis (the same at every repeat)."""
    config = load_config(backbone, dtype, image_size, batch_size * mesh.size)
    lowers, compiles = [], []
    for _ in range(repeats):
        num_params, lower_s, compile_s, compiled = compile_step(config, mesh)
        lowers.append(lower_s)
        compiles.append(compile_s)
    totals = [l + c for l, c in zip(lowers, compiles)]
    return dict(backbone=backbone, dtype=dtype, size=config.data.image_size,
                params=num_params / 1e6, lower=statistics.median(lowers),
                compile=statistics.median(compiles), total=statistics.median(totals),
                total_range=(min(totals), max(totals)), memory=memory_mib(compiled))


COLUMNS = ("backbone", "size", "batch/device", "dtype", "params (M)", "lower s", "compile s",
           "lower+compile s", "arguments MiB", "outputs MiB (donated)", "temporaries MiB",
           "code MiB")


def table_row(row: dict, batch_size: int) -> str:
    """One markdown row of `measure`'s result."""
    memory = row["memory"]
    if memory is None:
        mem_cells = ["n/a"] * 4
    else:
        mem_cells = [f"{memory['arguments']:.1f}",
                     f"{memory['outputs']:.1f} ({memory['donated']:.1f})",
                     f"{memory['temporaries']:.1f}", f"{memory['code']:.2f}"]
    low, high = row["total_range"]
    total = f"{row['total']:.1f}" + (f" ({low:.1f}-{high:.1f})" if high > low else "")
    cells = [row["backbone"], str(row["size"]), str(batch_size), row["dtype"],
             f"{row['params']:.2f}", f"{row['lower']:.1f}", f"{row['compile']:.1f}", total,
             *mem_cells]
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help=f"backbone computation dtypes, comma-separated, of "
                             f"{', '.join(DTYPES)}")
    parser.add_argument("--batch_size", type=int, default=32, help="examples per device")
    parser.add_argument("--image_size", type=int, default=0,
                        help="H = W of the input; 0: each backbone's config (see the docstring)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh compilations per case; the table shows the median seconds")
    parser.add_argument("--matmul_precision", choices=("default", "high", "highest"),
                        default="default",
                        help="jax_default_matmul_precision (float32 matmuls on GPU/TPU; no effect "
                             "on the CPU)")
    args = parser.parse_args()
    backbones = train_throughput.names(args.backbones, list(CONFIGS), "backbones")
    dtypes = train_throughput.names(args.dtypes, DTYPES, "dtypes")
    if args.batch_size < 1 or args.repeats < 1 or args.image_size < 0:
        raise SystemExit("--batch_size and --repeats must be positive, --image_size >= 0")
    runtime_defaults.apply()  # the XLA flags (they change what XLA compiles) `fbnet` runs with
    # Fresh compilations only: a persistent cache would turn compile time into a cache read.
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    mesh = parallel.create_mesh()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; backend {jax.default_backend()}; "
          f"{jax.device_count()} x {device.device_kind}; matmul precision {args.matmul_precision}; "
          f"{args.batch_size} examples per device (global batch "
          f"{args.batch_size * jax.device_count()})", flush=True)
    rows = []
    for backbone in backbones:
        for dtype in dtypes:
            rows.append(measure(backbone, dtype, args.image_size or None, args.batch_size,
                                args.repeats, mesh))
            print(f"{backbone} {dtype}: compiled in {rows[-1]['total']:.1f}s", file=sys.stderr,
                  flush=True)  # progress; the table comes at the end
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print(table_row(row, args.batch_size))


if __name__ == "__main__":
    main()
