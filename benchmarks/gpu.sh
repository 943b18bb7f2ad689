#!/usr/bin/env bash
# One script for a single-GPU machine, under 10 minutes: the train step's throughput and MFU for
# vgg_face and resnet50 in bfloat16 at batches that fill the GPU (benchmarks/train_throughput.py
# --cases gpu_mfu: FLOPs from XLA's cost analysis of the compiled step, peak from the device's
# datasheet, PEAK_TFLOPS there), then, per backbone, `fbnet train` end to end at 112 px, batch
# 256, bf16, with WORKERS worker processes, from a prepared uint8 store and from the render cache,
# each against the bare step timed beside it (benchmarks/end_to_end.py prints the ratios).
# Results go to BENCHMARKS.md by hand, with the machine and versions this prints first.
#
#   bash benchmarks/gpu.sh                 # the python on PATH (a jax with its CUDA plugin)
#   PYTHON=.venv/bin/python WORKERS=12 bash benchmarks/gpu.sh
#
# It refuses to run without a GPU: CPU numbers of these cases take hours and mean nothing here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORKERS="${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PY'
import platform, jax, jaxlib, flax, optax
devices = jax.devices()
if devices[0].platform != "gpu":
    raise SystemExit(f"benchmarks/gpu.sh needs a GPU; JAX sees {devices}")
print(f"machine: {len(devices)} x {devices[0].device_kind}; python {platform.python_version()}, "
      f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}")
PY

echo "== train step, bfloat16 (XLA cost-analysis FLOPs; MFU against the datasheet's dense peak)"
timeout 200 "$PY" benchmarks/train_throughput.py --cases gpu_mfu --steps 20

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
for backbone in vgg_face resnet50; do
    echo "== end to end: fbnet train against the bare step, ${backbone}, ${WORKERS} workers"
    timeout 240 "$PY" benchmarks/end_to_end.py --backbone "$backbone" --dtype bfloat16 \
        --image_size 112 --batch 256 --steps 200 --log_every 40 --repeats 1 \
        --images 6000 --workers "$WORKERS" --workdir "$workdir" || true
done
