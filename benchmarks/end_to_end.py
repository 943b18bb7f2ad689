"""End to end: `fbnet train`'s examples/s from a prepared uint8 store and from the render cache,
against the bare step, side by side in one run.

Each round (--repeats) times, one after the other:

  bare          the train step `fbnet train` runs (augmentation and normalisation of uint8 faces
                included) on a batch already on the devices, nothing else
                (benchmarks/train_throughput.py's `bench`, input `augment`);
  uint8         `fbnet train` reading a uint8 store prepared at the training size: the manifest
                fixture of benchmarks/input_sources.py (--images JPEG scenes), written with
                `fbnet prepare --option image_size=N` once, in a config file written here;
  render_cache  `fbnet train` on the synthetic experiment (configs/synthetic.py, or
                --synthetic_config), its faces rendered ahead once into --workdir's render
                cache (the uint8 runs use the same config with the store as their source).

Both `fbnet train` runs use the same backbone, image size, batch, steps and data settings, no
periodic evaluation and no final one (`train.stop_after_steps`), and run as the command a user
types (a subprocess, the same XLA flags). Their rate is the median of the logged intervals after
the first (compilation is never in them); each round prints its ratio to the bare step timed in
the same round.

  python benchmarks/end_to_end.py                          # small_cnn, 112 px, batch 64
  python benchmarks/end_to_end.py --backbone vgg_face --batch 256 --dtype bfloat16   # a GPU

The fixture and the render cache are kept under --workdir (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import input_sources  # noqa: E402  pylint: disable=wrong-import-position
import train_throughput  # noqa: E402  pylint: disable=wrong-import-position
from data_pipelines.tfds_builders import prepare  # noqa: E402  pylint: disable=wrong-import-position
from fbnet_jax.core import runtime_defaults  # noqa: E402  pylint: disable=wrong-import-position

INPUTS = ("uint8", "render_cache")
_RATE = re.compile(r"\| ([\d.]+) steps/s ")

STORE_CONFIG = '''"""Written by benchmarks/end_to_end.py: the experiment on a uint8 store."""
from data_pipelines import pipeline
from fbnet_jax.core import config_files


def get_config():
    config = config_files.load({synthetic_config!r})
    with config.unlocked():
        config.data.sources = type(config.data.sources)({{"faces": pipeline.prepared_source(
            "manifest", {data_dir!r}, prepared_image_size={image_size})}})
        # (The compound evaluators name the synthetic sources; no run here evaluates.)
        config.evals = type(config.evals)({{"validation": config.evals.validation}})
    return config
'''


def train_rate(config: str, workdir: Path, args, extra: list[str]) -> list[float]:
    """Steps/s of each logged interval of one `fbnet train` run (a fresh work directory)."""
    command = [
        sys.executable, "-m", "fbnet_jax", "train", "--config", config,
        "--workdir", str(workdir), f"--config.model.backbone={args.backbone}",
        f"--config.model.dtype={args.dtype}", f"--config.data.image_size={args.image_size}",
        f"--config.data.global_batch_size={args.batch}",
        f"--config.data.num_workers={args.workers}",
        f"--config.train.num_steps={10 * args.steps}",
        f"--config.train.stop_after_steps={args.steps}",
        f"--config.train.log_every={args.log_every}",
        f"--config.train.checkpoint_every={10 * args.steps}",
        "--config.evals.validation.every=0", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    if result.returncode not in (0, 75):  # 75: stopped by train.stop_after_steps, as asked
        raise SystemExit(f"fbnet train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rates = [float(m.group(1)) for m in _RATE.finditer(result.stderr + result.stdout)]
    if len(rates) < 2:
        raise SystemExit(f"fbnet train logged {len(rates)} interval(s); give more --steps")
    return rates


def bare_rate(args) -> float:
    """The bare step's examples/s, timed in a process of its own (so that no memory this
    process's JAX would hold on an accelerator is missing from the `fbnet train` runs)."""
    result = subprocess.run(
        [sys.executable, __file__, "--bare_only", f"--backbone={args.backbone}",
         f"--dtype={args.dtype}", f"--image_size={args.image_size}", f"--batch={args.batch}",
         f"--bare_steps={args.bare_steps}"],
        cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"the bare step failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="steps of each fbnet train run")
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--bare_steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers of the runs")
    parser.add_argument("--images", type=int, default=4000,
                        help="JPEG scenes of the store's fixture (60%% go to its train split)")
    parser.add_argument("--synthetic_config", default="synthetic",
                        help="the config of the render_cache runs (synthetic:tiny for a quick "
                             "try: fewer faces to render)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--bare_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    runtime_defaults.apply()
    if args.bare_only:  # (bare_rate's process)
        ex_s, *_ = train_throughput.bench(args.backbone, args.image_size, args.batch, args.dtype,
                                          args.bare_steps, "augment")
        print(ex_s)
        return

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manual, data_dir = workdir / "raw", workdir / "prepared"
        if not (manual / "manifest.csv").exists():
            input_sources.write_dataset(manual, args.images, 160, 120)
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.prepare("manifest", manual, data_dir, {"image_size": args.image_size})
        store_config = workdir / "store_config.py"
        store_config.write_text(STORE_CONFIG.format(
            data_dir=str(data_dir), image_size=args.image_size,
            synthetic_config=args.synthetic_config))
        configs = {"uint8": (str(store_config), []),
                   "render_cache": (args.synthetic_config, [
                       f"--config.data.render_cache_dir={workdir / 'render_cache'}"])}

        bare, rates = [], {name: [] for name in INPUTS}
        for round_ in range(args.repeats):
            bare.append(bare_rate(args))
            for name in INPUTS:
                config, extra = configs[name]
                run = workdir / f"run-{args.backbone}-{name}-{round_}"
                shutil.rmtree(run, ignore_errors=True)  # a fresh run, never a restart
                intervals = train_rate(config, run, args, extra)
                rates[name].append(statistics.median(intervals[1:]) * args.batch)

    print(f"{args.backbone} {args.dtype}, {args.image_size} px, batch {args.batch}; "
          f"fbnet train: {args.steps} steps, {args.workers} worker(s), median of the logged "
          f"intervals after the first; {args.repeats} rounds")
    print()
    print("| input | examples/s (median) | per round | / bare step (per round) |")
    print("|---|---|---|---|")
    print(f"| bare step (batch on the device) | {statistics.median(bare):.0f} | "
          f"{', '.join(f'{x:.0f}' for x in bare)} | 1.00 |")
    for name in INPUTS:
        label = {"uint8": "fbnet train, prepared uint8 store",
                 "render_cache": "fbnet train, render cache"}[name]
        print(f"| {label} | {statistics.median(rates[name]):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in rates[name])} | "
              f"{', '.join(f'{x / b:.2f}' for x, b in zip(rates[name], bare))} |")


if __name__ == "__main__":
    main()
