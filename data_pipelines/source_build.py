"""From a source's config entry to a random-access source of records (`build_source`).

Dataset sources are built once per process and (source, split) (`_dataset_source`, cached), so
periodic evaluations do not read the label files again. Synthetic sources with `cache=True`
keep their rendered faces in memory or, with `data.render_cache_dir`, in files that every
process maps (`data_pipelines.render_cache`); `render_ahead` renders those files before a run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections

from data_pipelines import sources as datasets
from data_pipelines.source_config import (
    DATASET_SPLITS,
    SOURCE_KINDS,
    is_dataset,
    render_cache_fields,
    source_names,
    source_splits,
)
from fbnet_jax.core import taxonomy


def build_source(name: str, source_config: ml_collections.ConfigDict, *, split: str,
                 aus: Sequence[int], source_index: int, render_cache_dir: str = "",
                 render_processes: int = 0) -> grain.sources.RandomAccessDataSource:
    """Builds one dataset of the mixture from its config entry.

    Args:
      name: the source's key in `config.data.sources` (used in keys and messages).
      source_config: its entry; `kind` picks the format, the other fields are kind-specific.
      split: "train", or an evaluation split such as "test".
      aus: the configured AU list; every record's `au` follows it.
      source_index: the value written into each record's `source`.
      render_cache_dir, render_processes: `config.data`'s fields of those names: where a
        synthetic source with `cache=True` keeps its rendered faces ("": in this process's
        memory; a folder: `data_pipelines.render_cache`, rendered there first if missing) and
        with how many processes it renders them there.

    Returns:
      A random-access source of schema records.

    Raises:
      ValueError: for an unknown `kind`, or a split the source does not have.
    """
    kind = source_config.kind
    if kind == "synthetic":
        return _synthetic_source(name, source_config, split=split, aus=aus,
                                 source_index=source_index, render_cache_dir=render_cache_dir,
                                 render_processes=render_processes)
    if is_dataset(kind):
        if split not in DATASET_SPLITS:
            raise ValueError(f"source {name!r} has no split {split!r}; dataset sources have "
                             f"{', '.join(DATASET_SPLITS)}")
        prepared = (source_config.data_dir if kind == "prepared"
                    else source_config.get("prepared", ""))
        options = source_config.options.to_dict()
        if prepared:  # the copy `fbnet prepare` wrote
            dataset = source_config.dataset if kind == "prepared" else kind
            args = ("prepared", prepared, split, dataset, False)
            # Entries written before the field existed read the PNG preparation.
            options["image_size"] = int(source_config.get("prepared_image_size", 0))
        else:
            args = (kind, source_config.root, split, None, bool(source_config.strict))
        return _dataset_source(name, *args, tuple(aus), source_index,
                               float(source_config.margin), tuple(sorted(options.items())))
    raise ValueError(f"source {name!r} has unknown kind {kind!r}; known kinds: {SOURCE_KINDS}")


@functools.lru_cache(maxsize=64)
def _dataset_source(name: str, kind: str, root: str, split: str, dataset: str | None,
                    strict: bool, aus: tuple[int, ...], source_index: int, margin: float,
                    options: tuple[tuple[str, Any], ...]):
    """A dataset source, built once per process: every periodic evaluation asks for its split
    again, and building reads the label files and checks every image file."""
    if dataset is not None:
        source = datasets.get_source(kind, root, split, dataset=dataset, aus=aus,
                                     source_index=source_index, margin=margin, **dict(options))
    else:
        source = datasets.get_source(
            kind, root, split, aus=aus, source_index=source_index, strict=strict, margin=margin,
            unreadable="next" if split == "train" else "mask", **dict(options))
    logging.info("source %s: %s", name, source.info().line())
    return source


def _synthetic_faces(name, source_config, *, split, aus, source_index):
    """The records of a synthetic source's split, rendered as they are read (no cache)."""
    num_records = _split_size(name, source_config, split)
    # Imported here so that the pipeline (and every other kind) works without the generator.
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top

    fields = source_config.synthetic.to_dict()
    style = synthetic.Style(**fields.pop("style", {}))
    if fields.get("label_aus") is not None:
        fields["label_aus"] = tuple(fields["label_aus"])
    spec = synthetic.SyntheticSpec(**fields, style=style)
    return synthetic.SyntheticFaces(spec, split=split, num_records=num_records, aus=tuple(aus),
                                    source_index=source_index, name=name)


def _synthetic_source(name, source_config, *, split, aus, source_index, render_cache_dir="",
                      render_processes=0):
    faces = _synthetic_faces(name, source_config, split=split, aus=aus,
                             source_index=source_index)
    if not source_config.get("cache", False):
        return faces
    # One cached source per split and process: periodic evaluations find their split
    # rendered.
    return _cached_synthetic(faces.spec, split, len(faces), faces.aus, source_index, name,
                             str(render_cache_dir or ""), int(render_processes))


@functools.lru_cache(maxsize=64)
def _cached_synthetic(spec, split: str, num_records: int, aus: tuple[int, ...],
                      source_index: int, name: str, render_cache_dir: str,
                      render_processes: int):
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    if render_cache_dir:
        from data_pipelines import render_cache  # pylint: disable=g-import-not-at-top
        faces = synthetic.SyntheticFaces(spec, split=split, num_records=num_records, aus=aus,
                                         source_index=source_index, name=name)
        return render_cache.open_set(faces, render_cache_dir, render_processes)
    return synthetic.SyntheticFaces(spec, split=split, num_records=num_records, aus=aus,
                                    source_index=source_index, name=name, cache=True)


def render_ahead(data_config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """Renders every split of every cached synthetic source into `data_config.render_cache_dir`
    that the folder does not hold yet, with `render_processes` processes sharing all of them.

    Returns `render_cache.render`'s summary, or None when `render_cache_dir` is empty (faces
    are then cached in each process's memory as they are read).
    """
    fields = render_cache_fields(data_config)
    directory = fields["render_cache_dir"]
    if not directory:
        return None
    from data_pipelines import render_cache  # pylint: disable=g-import-not-at-top
    aus = taxonomy.check_au_list(data_config.aus)
    sets = [_synthetic_faces(name, data_config.sources[name], split=split, aus=aus,
                             source_index=k)
            for k, name in enumerate(source_names(data_config))
            if data_config.sources[name].kind == "synthetic"
            and data_config.sources[name].get("cache", False)
            for split in source_splits(data_config.sources[name])]
    summary = render_cache.render(sets, directory, fields["render_processes"])
    line = f"render cache {directory}: {summary['present']} of {len(sets)} sets already there"
    if summary["rendered"]:
        line += (f"; rendered {summary['rendered']} ({summary['faces']} faces, "
                 f"{summary['bytes'] / 1e6:.0f} MB) in {summary['seconds']:.1f} s with "
                 f"{summary['processes']} process(es), "
                 f"{summary['faces'] / summary['seconds']:.0f} faces/s")
    logging.info("%s", line)
    return summary


def _split_size(name: str, source_config: ml_collections.ConfigDict, split: str) -> int | None:
    """Size of a generated split: None (the spec's own) for "train", else `<split>_size`."""
    if split == "train":
        return None
    field = f"{split}_size"
    if field not in source_config:
        raise ValueError(f"source {name!r} has no split {split!r}: its config has no {field!r}")
    return int(source_config[field])
