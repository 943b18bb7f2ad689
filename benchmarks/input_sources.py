"""Reading a dataset: raw files (decode JPEG, crop the face) vs the copy `fbnet prepare` wrote.

Writes a fixture dataset in the manifest format (N full-scene JPEGs, 640x480 by default, each
with one face box, labelled with an expression), prepares it with `fbnet prepare`'s function,
then measures, side by side and alternating over `--repeats` rounds:

  source   records/s of `source[i]` over every record (one core, no pipeline): what one grain
           worker can deliver;
  pipeline examples/s of the train iterator (resize to --image_size, augment, normalise, batch
           64) after a warm-up, with --workers grain worker processes.

  python benchmarks/input_sources.py                    # 2000 images, 0 workers, 3 rounds
  python benchmarks/input_sources.py --images 500 --workers 2 --repeats 5

Prints medians and the prepared/raw ratio of each round's pair. The fixture is written under
--workdir (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from data_pipelines.sources import get_source  # noqa: E402  pylint: disable=wrong-import-position
from data_pipelines.tfds_builders import prepare  # noqa: E402  pylint: disable=wrong-import-position
from fbnet_jax import config_files  # noqa: E402  pylint: disable=wrong-import-position


def write_dataset(folder: Path, images: int, width: int, height: int) -> None:
    """A manifest of `images` JPEG scenes (quality 90), a face box in each."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    lines = ["path,expression,x0,y0,x1,y1,split"]
    for k in range(images):
        base = (np.sin(xx / (17 + k % 13)) + np.cos(yy / (11 + k % 7))) * 60 + 128
        scene = np.clip(base[..., None] + rng.normal(0, 4, (height, width, 3)), 0, 255)
        side = int(rng.integers(height // 4, height // 2))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        scene[y0:y0 + side, x0:x0 + side] *= 0.6
        Image.fromarray(scene.astype(np.uint8)).save(folder / "img" / f"{k:06d}.jpg", quality=90)
        split = ("train", "train", "train", "validation", "test")[k % 5]
        lines.append(f"img/{k:06d}.jpg,{k % 7},{x0},{y0},{x0 + side},{y0 + side},{split}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")


def source_rate(source) -> float:
    start = time.perf_counter()
    for i in range(len(source)):
        source[i]
    return len(source) / (time.perf_counter() - start)


def pipeline_rate(config, batches: int, warmup: int) -> float:
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * config.data.global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manual, data_dir = workdir / "raw", workdir / "prepared"
        if not (manual / "manifest.csv").exists():
            write_dataset(manual, args.images, args.width, args.height)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            summary = prepare.prepare("manifest", manual, data_dir, {})
        prepare_s = time.perf_counter() - start
        jpeg_kb = np.mean([p.stat().st_size for p in (manual / "img").iterdir()]) / 1024
        prepared_mb = sum(p.stat().st_size for p in Path(summary.directory).rglob("*")
                          if p.is_file()) / 2**20

        config = config_files.load("synthetic")
        config.data.image_size = args.image_size
        config.data.num_workers = args.workers
        configs = {}
        for name, entry in (("raw", pipeline.dataset_source("manifest", str(manual))),
                            ("prepared", pipeline.prepared_source("manifest", str(data_dir)))):
            configs[name] = config.copy_and_resolve_references()
            with configs[name].unlocked():
                configs[name].data.sources = type(config.data.sources)({"faces": entry})
        sources = {"raw": get_source("manifest", manual, "train"),
                   "prepared": get_source("prepared", data_dir, "train", dataset="manifest")}

        rates = {(kind, what): [] for kind in ("raw", "prepared") for what in ("source",
                                                                               "pipeline")}
        for _ in range(args.repeats):
            for kind in ("raw", "prepared"):
                rates[kind, "source"].append(source_rate(sources[kind]))
                rates[kind, "pipeline"].append(pipeline_rate(configs[kind], args.batches, 5))

    prepared_how = (f"prepared in {prepare_s:.1f} s" if summary.written
                    else "prepared by an earlier run")
    print(f"{args.images} JPEG scenes {args.width}x{args.height} (mean {jpeg_kb:.0f} KB), one face "
          f"box each; train split {len(sources['raw'])} records; {prepared_how} "
          f"({prepared_mb:.0f} MB of array_record, PNG faces)")
    print(f"pipeline: {args.image_size} px, batch {config.data.global_batch_size}, "
          f"{args.workers} worker(s); {args.repeats} rounds, medians")
    print()
    print("| measure | raw (records/s) | prepared (records/s) | prepared / raw (per round) |")
    print("|---|---|---|---|")
    for what in ("source", "pipeline"):
        raw, prepared = rates["raw", what], rates["prepared", what]
        ratios = ", ".join(f"{p / r:.2f}" for r, p in zip(raw, prepared))
        print(f"| {what} | {statistics.median(raw):.0f} | {statistics.median(prepared):.0f} | "
              f"{ratios} |")


if __name__ == "__main__":
    main()
