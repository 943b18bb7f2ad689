"""Reading faces, per format: raw JPEGs, the PNG and raw uint8 copies `fbnet prepare` writes,
and synthetic rendering (each time, once into the source's memory cache, or once ahead into
render-cache files).

Writes a fixture dataset in the manifest format (N full-scene JPEGs, 640x480 by default, each
with one face box, labelled with an expression), prepares it twice with `fbnet prepare`'s
function (PNG faces as served; raw uint8 faces at --image_size, `--option image_size=N`), then
measures, side by side and alternating over `--repeats` rounds, six formats:

  jpeg       decode the scene JPEG, crop the face box (widened by the margin);
  png        the prepared copy: decode the PNG face;
  uint8      the prepared copy at the training size: no decoding, no resizing;
  synthetic  render a face of configs/synthetic.py's affwild2_like source at --image_size;
  cached     the same source with `cache=True`, every face already rendered once into the
             process's memory (what every epoch after the first costs);
  render_cache  the same source with `cache=True` and `data.render_cache_dir`: every face
             rendered ahead into files by --render_processes processes (timed and printed),
             read from there (what every epoch costs, the first included, in every worker);

and three measures:

  source   records/s of `source[i]` over every record (one core, no pipeline);
  pipeline examples/s of the train iterator (resize to --image_size, batch 64: uint8 faces,
           augmented and normalised later, on the device, in the train step) after a warm-up,
           with --workers grain worker processes (0: in this process): each batch read with one
           batched call, which the uint8 copy and the render cache serve together;
  before   the path before issue 23 (2026-12-06), timed in the same round: the same iterator
           reading one example at a time through grain, the uint8 copy as TFDS wrote it
           (zstd-compressed records, a copy made for this) and read with TFDS's decoder, and
           per face the host-side augmentation (`transforms.RandomAugment`, the config's
           data.augment) and normalisation to float32. (Label masks are made per batch in
           both; before, they were made per example.)

With --workers 0 the pipeline column is what one worker (one core) delivers, and the last
column is the cores a step consuming --target examples/s needs at that rate.

  python benchmarks/input_sources.py                    # 2000 images, 0 workers, 3 rounds
  python benchmarks/input_sources.py --images 500 --workers 2 --repeats 5
  python benchmarks/input_sources.py --formats uint8 render_cache --images 30000 \
      --width 160 --height 120 --synthetic_records 18000    # stores of a realistic length

grain's shuffle costs more per example the shorter a source is (its index permutation walks
cycles: about 30 us an example at 600 records, 5 at 20,000, 4 at 100,000 on the machine of
BENCHMARKS.md), so the fast formats are measured on train splits of realistic length with the
last command.

Prints medians and the ratio of each round to jpeg's. The fixture is written under --workdir
(default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
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

from data_pipelines import mixture, pipeline, transforms  # noqa: E402  pylint: disable=wrong-import-position
from data_pipelines.sources import prepared  # noqa: E402  pylint: disable=wrong-import-position
from data_pipelines.tfds_builders import faces, prepare  # noqa: E402  pylint: disable=wrong-import-position
from fbnet_jax.core import config_files, images  # noqa: E402  pylint: disable=wrong-import-position
from fbnet_jax.core import runtime_defaults  # noqa: E402  pylint: disable=wrong-import-position


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


FORMATS = ("jpeg", "png", "uint8", "synthetic", "cached", "render_cache")
MEASURES = ("source", "pipeline", "before")


class _Head:
    """The first `n` records of `source`."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.source[index]


def _megabytes(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def source_rate(source) -> float:
    start = time.perf_counter()
    for i in range(len(source)):
        source[i]
    return len(source) / (time.perf_counter() - start)


def _host_path(batch, augment: transforms.RandomAugment, rng: np.random.Generator) -> np.ndarray:
    """The old host work on a batch: every face augmented and normalised, one by one."""
    return np.stack([images.to_model_input(augment.random_map({"image": face}, rng)["image"])
                     for face in batch["image"]])


def compressed_copy(directory: Path, copy: Path) -> None:
    """A copy of a preparation with its record files as TFDS writes them (zstd, level 3)."""
    if copy.exists():
        return
    shutil.copytree(directory, copy)
    for path in faces.record_files(copy):
        faces.rewrite_records(path, faces.TFDS_WRITES)


@contextlib.contextmanager
def _reading_as_before():
    """The reads of the path before: one example at a time through grain's chain, records of a
    preparation decoded by TFDS's decoder."""
    per_example = lambda self, indices: [self._parent[i] for i in indices]  # noqa: E731
    decoded = lambda self, index: self.decoded(int(index) % len(self))  # noqa: E731
    saved = mixture._ProcessBatches._read, prepared.PreparedSource.__getitem__
    mixture._ProcessBatches._read, prepared.PreparedSource.__getitem__ = per_example, decoded
    try:
        yield
    finally:
        mixture._ProcessBatches._read, prepared.PreparedSource.__getitem__ = saved


def pipeline_rate(config, batches: int, warmup: int, before: bool = False) -> float:
    augment = transforms.RandomAugment(**config.data.augment.to_dict())
    rng = np.random.default_rng(0)
    with contextlib.ExitStack() as stack:
        if before:
            stack.enter_context(_reading_as_before())
        it = stack.enter_context(contextlib.closing(pipeline.build_train_iterator(
            config, process_index=0, process_count=1)))
        for _ in range(warmup):
            batch = next(it)
            if before:
                _host_path(batch, augment, rng)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            if before:
                _host_path(batch, augment, rng)
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
    parser.add_argument("--synthetic_records", type=int, default=0,
                        help="faces in the synthetic train split (0: the config's)")
    parser.add_argument("--render_processes", type=int, default=0,
                        help="processes rendering the render_cache format's files (0: one per "
                             "core)")
    parser.add_argument("--target", type=int, default=20_000,
                        help="examples/s of the step to feed (the last column)")
    args = parser.parse_args()
    runtime_defaults.apply()  # the malloc settings (and XLA flags) `fbnet` reads faces with
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
        flags.FLAGS.mark_as_parsed()

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manual, data_dir = workdir / "raw", workdir / "prepared"
        if not (manual / "manifest.csv").exists():
            write_dataset(manual, args.images, args.width, args.height)
        seconds, sizes = {}, {"jpeg": _megabytes((manual / "img").iterdir())}
        for kind, options in (("png", {}), ("uint8", {"image_size": args.image_size})):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                summary = prepare.prepare("manifest", manual, data_dir, options)
            seconds[kind] = time.perf_counter() - start if summary.written else None
            sizes[kind] = _megabytes(Path(summary.directory).rglob("*.array_record*"))
        # The uint8 copy as it was written before (zstd), for the path before.
        zstd_dir = workdir / "prepared_zstd"
        compressed_copy(Path(summary.directory),
                        zstd_dir / Path(summary.directory).relative_to(data_dir))
        sizes["uint8 zstd (before)"] = _megabytes(zstd_dir.rglob("*.array_record*"))

        config = config_files.load("synthetic")
        config.data.image_size = args.image_size
        config.data.num_workers = args.workers
        config.data.render_cache_dir = ""   # cached: in memory; render_cache: below
        synthetic = config.data.sources.affwild2_like.copy_and_resolve_references()
        synthetic.cache = False
        if args.synthetic_records:
            synthetic.synthetic.num_records = args.synthetic_records
        cached = synthetic.copy_and_resolve_references()
        cached.cache = True
        entries = {
            "jpeg": pipeline.dataset_source("manifest", str(manual)),
            "png": pipeline.prepared_source("manifest", str(data_dir)),
            "uint8": pipeline.prepared_source("manifest", str(data_dir),
                                              prepared_image_size=args.image_size),
            "synthetic": synthetic, "cached": cached, "render_cache": cached}
        configs, sources = {}, {}
        for kind, entry in entries.items():
            configs[kind] = config.copy_and_resolve_references()
            with configs[kind].unlocked():
                configs[kind].data.sources = type(config.data.sources)({"faces": entry})
            if kind == "render_cache":
                configs[kind].data.render_cache_dir = str(workdir / "render_cache")
                configs[kind].data.render_processes = args.render_processes
                with contextlib.redirect_stdout(io.StringIO()):
                    rendered = pipeline.render_ahead(configs[kind].data)
            sources[kind] = pipeline.build_source(
                "faces", configs[kind].data.sources.faces, split="train", aus=config.data.aus,
                source_index=0, **pipeline.render_cache_fields(configs[kind].data))
        # The cached source (the one object the pipeline builds too) renders every face once.
        for i in range(len(sources["cached"])):
            sources["cached"][i]
        # The path before read the uint8 copy as TFDS wrote it (zstd).
        befores = dict(configs)
        befores["uint8"] = configs["uint8"].copy_and_resolve_references()
        befores["uint8"].data.sources.faces.data_dir = str(zstd_dir)
        # The synthetic sources are as long as the fixture's train split, for equal rounds.
        for kind in ("synthetic", "cached"):
            sources[kind] = _Head(sources[kind], len(sources["jpeg"]))

        rates = {(kind, what): [] for kind in FORMATS for what in MEASURES}
        for _ in range(args.repeats):
            for kind in FORMATS:
                rates[kind, "source"].append(source_rate(sources[kind]))
                rates[kind, "pipeline"].append(pipeline_rate(configs[kind], args.batches, 5))
                if not args.workers:  # (the reads of before are set in this process only)
                    rates[kind, "before"].append(pipeline_rate(befores[kind], args.batches, 5,
                                                               before=True))

    made = ", ".join(f"{kind} in {s:.1f} s" for kind, s in seconds.items() if s is not None)
    print(f"{args.images} JPEG scenes {args.width}x{args.height}, one face box each; train split "
          f"{len(sources['jpeg'])} records; prepared {made or 'by an earlier run'}")
    if rendered["rendered"]:
        print(f"render_cache: every split of the synthetic source, {rendered['faces']} faces, "
              f"rendered ahead in {rendered['seconds']:.1f} s by {rendered['processes']} "
              f"process(es): {rendered['faces'] / rendered['seconds']:.0f} faces/s")
    else:
        print("render_cache: rendered by an earlier run")
    print("storage, MB per 1000 images: " + ", ".join(
        f"{kind} {mb / args.images * 1000:.1f}" for kind, mb in sizes.items()))
    print(f"pipeline: {args.image_size} px, batch {config.data.global_batch_size}, "
          f"{args.workers} worker(s); {args.repeats} rounds, medians; train splits: "
          f"{len(sources['jpeg'])} records (jpeg, png, uint8), "
          f"{len(sources['render_cache'])} (synthetic, cached, render_cache)")
    print()
    print(f"| format | source (records/s) | / jpeg (per round) | pipeline (examples/s) | "
          f"/ jpeg (per round) | before (examples/s) | pipeline / before "
          f"(per round) | cores for {args.target:,} ex/s |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in FORMATS:
        cells = []
        for what in ("source", "pipeline"):
            mine, jpeg = rates[kind, what], rates["jpeg", what]
            ratios = ", ".join(f"{m / j:.2f}" for m, j in zip(mine, jpeg))
            cells += [f"{statistics.median(mine):.0f}", ratios]
        new, old = rates[kind, "pipeline"], rates[kind, "before"]
        cells += [f"{statistics.median(old):.0f}" if old else "-",
                  ", ".join(f"{n / o:.2f}" for n, o in zip(new, old)) or "-"]
        cores = args.target / statistics.median(rates[kind, "pipeline"])
        print(f"| {kind} | {' | '.join(cells)} | {cores:.1f} |")


if __name__ == "__main__":
    main()
