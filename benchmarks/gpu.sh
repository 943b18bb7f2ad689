#!/usr/bin/env bash
# One script for a single-GPU machine, under 5 minutes: the train step's throughput and MFU for
# vgg_face and resnet50 in bfloat16 at batches that fill the GPU (benchmarks/train_throughput.py
# --cases gpu_mfu: FLOPs from XLA's cost analysis of the compiled step, peak from the device's
# datasheet, PEAK_TFLOPS there), then one end-to-end `fbnet train` of the default experiment with
# worker processes, whose log gives its ex/s and the time to render its faces ahead (into an
# empty render cache, one process per core). Results go to BENCHMARKS.md by hand, with the
# machine and versions this prints first.
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

echo "== end to end: fbnet train, small_cnn, batch 256, 600 steps, ${WORKERS} workers"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
start=$(date +%s)
timeout 150 "$PY" -m fbnet_jax train --workdir "$workdir/run" \
    --config.data.num_workers="$WORKERS" --config.data.global_batch_size=256 \
    --config.train.num_steps=600 --config.train.log_every=100 \
    --config.data.render_cache_dir="$workdir/faces" \
    --config.evals.validation.every=0 2>&1 | grep -E "render cache|compiled|ex/s|^all " || true
echo "wall: $(( $(date +%s) - start )) s (start-up, compilation and the final evaluation included)"
