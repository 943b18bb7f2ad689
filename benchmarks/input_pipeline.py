"""Input pipeline throughput: the train iterator of a config, with several worker counts.

Prints one table row per worker count: examples/s after warm-up, seconds to the first batch,
and the single-core cost of one record of each source (rendering or decoding), which bounds what
one worker can deliver.

  python benchmarks/input_pipeline.py                       # configs/synthetic.py, 0 and 2 workers
  python benchmarks/input_pipeline.py --workers 0 2 8 --batches 200
  python benchmarks/input_pipeline.py --workers 0 --rendered   # every face already in the cache
  python benchmarks/input_pipeline.py --workers 0 1 2 --render_cache_dir /tmp/faces

With the demo's cached synthetic sources (`cache=True`), the timed batches of a fresh iterator
mostly render faces (the first epoch); --rendered first renders every training face of every
cached source into the cache the in-process iterator reads (what later epochs cost). Worker
processes start with empty caches, so --rendered is for --workers 0. --render_cache_dir sets
`data.render_cache_dir`: the faces are rendered ahead into that folder (timed and printed, with
`data.render_processes`, unless the folder holds them already) and every worker count reads
them from there.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from absl import flags

from data_pipelines import pipeline
from fbnet_jax.core import runtime_defaults

REPO = Path(__file__).resolve().parents[1]


def load_config(path: str):
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", REPO / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def record_cost_ms(config, records: int) -> dict[str, float]:
    """Single-core milliseconds per record of each source's train split (CPU time)."""
    costs = {}
    for k, name in enumerate(pipeline.source_names(config.data)):
        source = pipeline.build_source(name, config.data.sources[name], split="train",
                                       aus=config.data.aus, source_index=k)
        start = time.process_time()
        for i in range(records):
            source[i]
        costs[name] = (time.process_time() - start) / records * 1e3
    return costs


def render_all(config) -> float:
    """Renders every training face of each cached synthetic source (the source objects the
    in-process train iterator reads); returns the seconds it took."""
    start = time.perf_counter()
    for k, name in enumerate(pipeline.source_names(config.data)):
        entry = config.data.sources[name]
        if entry.kind == "synthetic" and entry.get("cache", False) and entry.weight > 0:
            source = pipeline.build_source(name, entry, split="train", aus=config.data.aus,
                                           source_index=k)
            for i in range(len(source)):
                source[i]
    return time.perf_counter() - start


def iterator_throughput(config, workers: int, batches: int, warmup: int) -> tuple[float, float]:
    """(examples/s after `warmup` batches, seconds to the first batch)."""
    config.data.num_workers = workers
    start = time.perf_counter()
    iterator = pipeline.build_train_iterator(config)
    try:
        next(iterator)
        first = time.perf_counter() - start
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        seconds = time.perf_counter() - start
        del batch
    finally:
        pipeline.close_iterator(iterator)
    return batches * config.data.global_batch_size / seconds, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.py")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--records", type=int, default=300, help="records timed per source")
    parser.add_argument("--rendered", action="store_true",
                        help="render every training face of the cached synthetic sources before "
                             "timing (with --workers 0 only)")
    parser.add_argument("--render_cache_dir", default="",
                        help="render the cached synthetic sources ahead into this folder and "
                             "read them from there (config.data.render_cache_dir; default: "
                             "cache them in memory as read)")
    parser.add_argument("--render_processes", type=int, default=0,
                        help="processes rendering into --render_cache_dir (0: one per core)")
    args = parser.parse_args()
    runtime_defaults.apply()  # the malloc settings (and XLA flags) `fbnet train` reads with
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    config = load_config(args.config)
    print(f"config {args.config}: image {config.data.image_size}px, "
          f"batch {config.data.global_batch_size}, read_threads {config.data.read_threads}")
    print(f"{'source':<20} {'ms/record (1 core)':>18}")
    for name, ms in record_cost_ms(config, args.records).items():
        print(f"{name:<20} {ms:18.3f}")
    if args.rendered:
        if any(args.workers):
            parser.error("--rendered measures the in-process cache: use it with --workers 0")
        print(f"rendered into the caches first: {render_all(config):.1f} s")
    # Without --render_cache_dir, faces are cached in memory as they are read (as the script
    # measured before the config had a render cache).
    config.data.render_cache_dir = args.render_cache_dir
    config.data.render_processes = args.render_processes
    if args.render_cache_dir:
        summary = pipeline.render_ahead(config.data)
        print(f"render cache {args.render_cache_dir}: {summary['present']} sets there, "
              f"{summary['rendered']} rendered ({summary['faces']} faces) in "
              f"{summary['seconds']:.1f} s with {summary['processes']} process(es)")
    print()
    print(f"{'workers':>7} {'examples/s':>11} {'first batch s':>13}")
    for workers in args.workers:
        rate, first = iterator_throughput(config, workers, args.batches, args.warmup)
        print(f"{workers:>7} {rate:11.0f} {first:13.2f}", flush=True)


if __name__ == "__main__":
    main()
