"""The checks of `config.data`: sizes, batch splits, workers, augmentation and the sources.

Gathered with every other layer's by `fbnet_jax.train.checks.validate`; the sources' own
fields are checked by `pipeline.config_problems`.
"""

from __future__ import annotations

import os

import ml_collections

from data_pipelines import pipeline
from fbnet_jax.core import checks, taxonomy


def problems(config: ml_collections.ConfigDict, num_devices: int,
             num_processes: int) -> list[str]:
    """What is wrong with `config.data`, one line each (`num_devices` and `num_processes`: what
    the batch sizes must split over)."""
    out: list[str] = []
    data = config.data
    checks.in_range(out, "data.image_size", data.image_size, 1, integer=True)
    try:
        taxonomy.check_au_list(data.aus)
    except ValueError as e:
        out.append(f"data.aus: {e}")
    for field in ("global_batch_size", "eval_batch_size"):
        value = data[field]
        checks.in_range(out, f"data.{field}", value, 1, integer=True)
        if isinstance(value, int) and value >= 1:
            for count, what in ((num_devices, "devices"), (num_processes, "processes")):
                if value % count:
                    out.append(f"data.{field}: {value} does not split evenly over the "
                               f"{count} {what} of this machine; use a multiple of {count}")
    checks.in_range(out, "data.num_workers", data.num_workers, 0, integer=True)
    checks.in_range(out, "data.worker_buffer_size", data.worker_buffer_size, 1, integer=True)
    checks.in_range(out, "data.read_threads", data.read_threads, 1, integer=True)
    checks.in_range(out, "data.prefetch_buffer_size", data.prefetch_buffer_size, 0, integer=True)
    checks.in_range(out, "data.device_prefetch", data.get("device_prefetch", 0), 0, integer=True)
    checks.in_range(out, "data.render_processes", data.get("render_processes", 0), 0,
                    integer=True)
    cache_dir = data.get("render_cache_dir", "")
    if not isinstance(cache_dir, str):
        out.append(f"data.render_cache_dir: must be a folder or '' (memory), got {cache_dir!r}")
    elif cache_dir:
        problem = checks.folder_problem(os.path.expanduser(cache_dir))
        if problem:
            out.append(f"data.render_cache_dir: {problem} (or set it to '' to keep "
                       f"rendered faces in each process's memory)")
    checks.in_range(out, "data.augment.flip", data.augment.flip, 0, 1)
    for field in ("max_shift", "max_scale", "brightness", "contrast"):
        checks.in_range(out, f"data.augment.{field}", data.augment[field], 0, 1, high_open=True)
    source_problems = pipeline.config_problems(data)
    out.extend(source_problems)
    if source_problems:
        return out
    splits = {name: pipeline.source_splits(data.sources[name])
              for name in pipeline.source_names(data)}
    untrainable = [name for name, have in splits.items()
                   if "train" not in have and float(data.sources[name].weight) > 0]
    if untrainable:
        out.append(f"data.sources: {', '.join(untrainable)} have no 'train' split but a "
                   f"weight > 0 (set their weight to 0 to evaluate them only)")
    return out


def warnings(config: ml_collections.ConfigDict) -> list[str]:
    """Valid settings that cost speed: a uint8 preparation at another size than the training's
    (every face is then resized on the host, every time it is read)."""
    out = []
    for name in pipeline.source_names(config.data):
        size = config.data.sources[name].get("prepared_image_size", 0)
        if size and size != config.data.image_size:
            out.append(f"data.sources.{name}.prepared_image_size is {size}, data.image_size "
                       f"{config.data.image_size}: every face is resized on the host each time "
                       f"it is read; prepare a copy at {config.data.image_size} (fbnet prepare "
                       f"--option image_size={config.data.image_size}) to read faces as stored")
    return out
