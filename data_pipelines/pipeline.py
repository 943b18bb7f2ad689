"""The mixture: sources -> shuffle/repeat -> mix(weights) -> transforms -> batch -> prefetch.

Training (`build_train_iterator`) draws an endless stream of per-process batches from a weighted
mixture of sources; global batch n is a function of the config and n alone, whatever the number
of processes reading it. Evaluation (`build_eval_batches`) visits every example
of every source's evaluation split exactly once, padding so that no example is dropped and every
process runs the same number of steps.

The `source` index of an example is the position of its source in `source_names(config.data)`.

Closing: a train iterator with `config.data.num_workers > 0` owns worker processes and shared
memory. Close it when done, with `close_iterator(it)` in a `finally:` or with
`with contextlib.closing(build_train_iterator(config)) as it:`; closing twice is harmless.
(grain 0.2.18 iterators have `close()` but are not context managers.)
Evaluation batches need no closing: their grain iterator is closed when the loop over them ends
or the generator is discarded.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from data_pipelines import schema
from data_pipelines import sources as datasets
from data_pipelines import transforms
from data_pipelines import workers
from fbnet_jax.core import taxonomy

# The source kinds `build_source` knows: generated faces, every dataset format of
# data_pipelines.sources (config entries made by `dataset_source`), and the copies that
# `fbnet prepare` writes (entries made by `prepared_source`).
SOURCE_KINDS = ("synthetic", "prepared", *sorted(datasets.DATASETS))
# The splits every dataset source provides (data_pipelines.sources: each dataset's convention).
DATASET_SPLITS = ("test", "train", "validation")


def _is_dataset(kind: str) -> bool:
    return kind == "prepared" or kind in datasets.DATASETS


def prepared_source(dataset: str, data_dir: str = "", *, weight: float = 1.0,
                    margin: float = 0.2, balance_expressions: bool = False,
                    prepared_image_size: int = 0, **options) -> ml_collections.ConfigDict:
    """The config entry of a prepared dataset: `kind="prepared"`, `dataset`, `data_dir`.

    It reads what `fbnet prepare --dataset DATASET --data_dir DATA_DIR` wrote with the same
    options, margin and image_size (see `dataset_source` for the arguments). Equivalently, a
    `dataset_source` entry with its `prepared` field set to DATA_DIR.
    """
    entry = dataset_source(dataset, "", weight=weight, margin=margin,
                           balance_expressions=balance_expressions,
                           prepared_image_size=prepared_image_size, **options)
    del entry["root"], entry["prepared"], entry["strict"]
    entry.kind, entry.dataset, entry.data_dir = "prepared", dataset, data_dir
    return entry


def dataset_source(kind: str, root: str = "", *, weight: float = 1.0, margin: float = 0.2,
                   strict: bool = False, balance_expressions: bool = False, prepared: str = "",
                   prepared_image_size: int = 0, **options) -> ml_collections.ConfigDict:
    """The config entry of a dataset source (`config.data.sources.NAME`).

    Args:
      kind: a dataset name of `data_pipelines.sources.DATASETS` ("rafdb", "affwild2", ...).
      root: the dataset's folder as its publisher ships it (or the manifest file); usually
        given on the command line: `--config.data.sources.NAME.root=/path`.
      weight: the source's share of the training mixture (normalised over the sources).
      margin: face crops are widened by this fraction of the face box on every side.
      strict: stop at the first record that cannot be read instead of skipping and counting.
      prepared: the `--data_dir` of `fbnet prepare`: read the prepared copy of this dataset
        (with these options and margin) instead of the files under `root`.
      prepared_image_size: which preparation to read: 0 the faces as served (PNG), N the one
        written with `--option image_size=N` (raw uint8 N x N faces, read without decoding;
        set N to `data.image_size` so that nothing is resized either).
      balance_expressions: sample the source's training images so that every expression is
        equally frequent among its expression-labelled ones (real expression data is skewed:
        in AffectNet's training set Happiness outnumbers Disgust about 35 to 1).
      **options: the dataset's own options (`data_pipelines.sources.reader_options(kind)`),
        e.g. `task="va"` for affwild2.
    """
    known = datasets.reader_options(kind)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(known) or 'none'}")
    # Every option is in the entry (with its default), so any can be set from the command line.
    return ml_collections.ConfigDict({
        "kind": kind, "root": root, "weight": weight, "margin": margin, "strict": strict,
        "balance_expressions": balance_expressions, "prepared": prepared,
        "prepared_image_size": prepared_image_size,
        "options": ml_collections.ConfigDict({**known, **options})})


def source_names(data_config: ml_collections.ConfigDict) -> list[str]:
    """The names of the mixture's sources; position = the `source` index of their examples.

    This is the order in which `data_config.sources` iterates: alphabetical for a ConfigDict
    built with the default `sort_keys=True`, insertion order for `sort_keys=False`.
    """
    return list(data_config.sources.keys())


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
    if _is_dataset(kind):
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


def render_cache_fields(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`build_source`'s render-cache arguments from `config.data` (configs saved before the
    fields existed cache in memory)."""
    return dict(render_cache_dir=str(data_config.get("render_cache_dir", "") or ""),
                render_processes=int(data_config.get("render_processes", 0)))


def source_splits(source_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The splits a source provides, e.g. ("test", "train", "validation").

    A synthetic source has "train" plus one split per `<split>_size` field of its config.
    """
    if source_config.kind == "synthetic":
        sizes = sorted(k[:-len("_size")] for k in source_config.keys() if k.endswith("_size"))
        return tuple(sorted(["train", *sizes]))
    if _is_dataset(source_config.kind):
        return DATASET_SPLITS
    raise ValueError(f"unknown source kind {source_config.kind!r}; known kinds: {SOURCE_KINDS}")


def config_problems(data_config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with `config.data`'s sources, one message per problem (empty: nothing).

    Checks what can be checked without reading any data: known kinds, mixture weights, and the
    sizes of generated sources. Field names in messages are full paths (`data.sources.x.weight`).
    """
    names = source_names(data_config)
    if not names:
        return ["data.sources: empty; the mixture needs at least one source"]
    problems = []
    for name in names:
        source = data_config.sources[name]
        path = f"data.sources.{name}"
        if source.kind not in SOURCE_KINDS:
            problems.append(f"{path}.kind: unknown kind {source.kind!r}; known: "
                            f"{', '.join(SOURCE_KINDS)}")
            continue
        weight = float(source.weight)
        if not (math.isfinite(weight) and weight >= 0):
            problems.append(f"{path}.weight: must be finite and >= 0, got {source.weight}")
        if _is_dataset(source.kind):
            problems += _dataset_problems(path, source)
        if source.kind == "synthetic":
            if source.synthetic.num_records < 1:
                problems.append(f"{path}.synthetic.num_records: must be >= 1, got "
                                f"{source.synthetic.num_records}")
            for split in source_splits(source):
                if split != "train" and source[f"{split}_size"] < 1:
                    problems.append(f"{path}.{split}_size: must be >= 1, got "
                                    f"{source[f'{split}_size']}")
    if not problems and sum(float(data_config.sources[n].weight) for n in names) <= 0:
        problems.append(f"data.sources.*.weight: all weights are 0 ({', '.join(names)}); "
                        f"at least one source must be trained on")
    return problems


def _dataset_problems(path: str, source: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with a dataset source's entry, checked without reading its labels."""
    problems = []
    prepared_kind = source.kind == "prepared"
    fields = (("dataset", "data_dir") if prepared_kind else ("root", "strict")) + (
        "options", "margin", "balance_expressions")
    missing = [f for f in fields if f not in source]
    if missing:
        maker = "prepared_source" if prepared_kind else "dataset_source"
        return [f"{path}: a {source.kind} source needs the fields {', '.join(missing)} "
                f"(build its entry with data_pipelines.pipeline.{maker})"]
    dataset = source.dataset if prepared_kind else source.kind
    if dataset not in datasets.DATASETS:
        return [f"{path}.dataset: unknown dataset {dataset!r}; known: "
                f"{', '.join(sorted(datasets.DATASETS))}"]
    root = "" if prepared_kind else str(source.root or "")
    prepared = str((source.data_dir if prepared_kind else source.get("prepared", "")) or "")
    field = "data_dir" if prepared_kind else "prepared"
    if prepared_kind and not prepared:
        problems.append(f"{path}.data_dir: empty; give the --data_dir of fbnet prepare with "
                        f"--config.{path}.data_dir=/path/to/it")
    elif prepared:
        if not os.path.isdir(prepared):
            problems.append(f"{path}.{field}: {prepared} is not a folder (the --data_dir of "
                            f"fbnet prepare)")
    elif not root:
        problems.append(f"{path}.root: empty; give the {source.kind} dataset's folder with "
                        f"--config.{path}.root=/path/to/it (or a prepared copy's folder with "
                        f"--config.{path}.prepared=DATA_DIR)")
    elif not os.path.exists(root):
        problems.append(f"{path}.root: {root} does not exist")
    if not isinstance(source.get("balance_expressions", False), bool):
        problems.append(f"{path}.balance_expressions: must be True or False")
    known = datasets.reader_options(dataset)
    unknown = sorted(set(source.options.keys()) - set(known))
    if unknown:
        problems.append(f"{path}.options: {dataset} has no option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(known) or 'none'}")
    if not float(source.margin) >= 0:
        problems.append(f"{path}.margin: must be >= 0, got {source.margin}")
    size = source.get("prepared_image_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        problems.append(f"{path}.prepared_image_size: must be an int >= 0 (0: the preparation "
                        f"of faces as served), got {size!r}")
    return problems


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


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in the JAX process index/count where not given, and checks them."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  # only the defaults need JAX
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                         f"{process_index}, process_count={process_count}")
    return int(process_index), int(process_count)


def _per_process_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"{what} ({global_batch}) must be a positive multiple of the process "
                         f"count ({process_count})")
    return global_batch // process_count


def mixture_weights(data_config: ml_collections.ConfigDict) -> np.ndarray:
    """The sources' weights, normalised to sum 1, in `source_names` order.

    Raises:
      ValueError: for a negative or non-finite weight, or when all weights are 0.
    """
    names = source_names(data_config)
    if not names:
        raise ValueError("config.data.sources is empty: the mixture needs at least one source")
    weights = np.array([float(data_config.sources[n].weight) for n in names], np.float64)
    bad = {n: w for n, w in zip(names, weights.tolist()) if not (np.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"source weights must be finite and >= 0, got {bad}")
    if weights.sum() <= 0:
        raise ValueError(f"all source weights are 0: {dict(zip(names, weights.tolist()))}")
    return weights / weights.sum()


def _prepare(ds: grain.MapDataset, data_config: ml_collections.ConfigDict,
             aus: Sequence[int]) -> grain.MapDataset:
    """Decode and resize, plus schema checks when `validate_records` is set."""
    ds = ds.map(transforms.DecodeImage()).map(transforms.ResizeImage(data_config.image_size))
    if data_config.validate_records:
        ds = ds.map(transforms.ValidateRecord(len(aus)))
    return ds


def _finish(ds: grain.MapDataset) -> grain.MapDataset:
    return ds.map(transforms.Normalize()).map(transforms.ToMasks())


def _augment(augment_config: ml_collections.ConfigDict) -> transforms.RandomAugment:
    return transforms.RandomAugment(
        flip=augment_config.flip, max_shift=augment_config.max_shift,
        max_scale=augment_config.max_scale, brightness=augment_config.brightness,
        contrast=augment_config.contrast)


def shuffle_seed(seed: int, source_name: str) -> int:
    """The shuffle seed of one source: a stream of its own, derived from `seed` and its name.

    grain reshuffles each epoch with seed + epoch, so seeds that are neighbours (seed + k for the
    k-th source) would replay source k+1's order of epoch e as source k's order of epoch e+1.
    Hashing the name spreads the seeds over 2**32 values, and adding, removing or renaming a
    source leaves every other source's order as it was.
    """
    return int(np.random.SeedSequence(
        [seed, zlib.crc32(source_name.encode()), 0x5EED]).generate_state(1)[0])


def _augment_seed(seed: int) -> int:
    # random_map seeds each element from (this seed, its index in the global stream), so every
    # example's jitter is the same whichever process reads it. (The 0 keeps the seed that
    # single-process runs had when each process drew its own.)
    return int(np.random.SeedSequence([seed, 0, 0xA06]).generate_state(1)[0])


class _ProcessRows(grain.MapDataset):
    """This process's rows of each global batch of `parent`, a stream of examples.

    Global batch n is elements [n·G, (n+1)·G) of the parent; process p of P reads rows
    [p·b, (p+1)·b) of it (b = G / P). So element j here is parent element (j // b)·G + p·b + j % b,
    and only the rows this process feeds are ever read or decoded.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global_batch = global_batch
        self._rows = global_batch // process_count
        self._offset = process_index * self._rows
        self._length = len(parent) // global_batch * self._rows

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        return self._parent[batch * self._global_batch + self._offset + row]

    def __str__(self) -> str:
        return (f"_ProcessRows(rows {self._offset}-{self._offset + self._rows - 1} of every "
                f"{self._global_batch})")


def build_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                         process_count: int | None = None,
                         start_step: int = 0) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches from the weighted mixture.

    The data order is a function of the config and the step alone (docs/design.md#runtime): the
    sources, each shuffled with a new order every epoch, are mixed into one stream of examples,
    augmented with a seed per position in that stream, and cut into global batches of
    `global_batch_size`. Process p of P reads rows [p·b, (p+1)·b) of each global batch
    (b = global_batch_size // P), and only those. So global batch n holds the same examples,
    with the same augmentation, whether 1 or 64 processes read it, and a run can continue on
    another number of processes.

    Batches are dicts of numpy arrays: `image` float32 [b, H, W, 3], the fields of
    `schema.BATCH_LABEL_FIELDS`, and `key` (str [b]). The first batch is global batch
    `start_step`, which is how a restored run continues exactly where it stopped: the
    iterator has no state of its own to checkpoint. Close it when done (see the module
    docstring).

    Batching happens before `to_iter_dataset`, so `read_threads` threads (in each worker, when
    `num_workers > 0`) each build whole batches, and `prefetch_buffer_size` and
    `worker_buffer_size` count batches, not examples.

    Args:
      config: the experiment config (`seed` and `data` are read).
      process_index: which rows of each global batch this process reads; default
        `jax.process_index()`.
      process_count: number of processes sharing each global batch; default
        `jax.process_count()`.
      start_step: the index of the first global batch (the step a run continues from).

    Returns:
      A grain DatasetIterator.

    Raises:
      ValueError: for bad weights, a batch size that does not split over the processes, an
        unknown source kind, or a source without training examples.
    """
    data = config.data
    process_index, process_count = _process_shard(process_index, process_count)
    batch_size = _per_process_batch(data.global_batch_size, process_count,
                                    "config.data.global_batch_size")
    aus = taxonomy.check_au_list(data.aus)
    weights = mixture_weights(data)
    datasets, mix_weights = [], []
    for k, name in enumerate(source_names(data)):
        if weights[k] == 0:  # not trained on; still evaluated, and keeps its index
            continue
        source = workers.Noted(build_source(name, data.sources[name], split="train", aus=aus,
                                            source_index=k, **render_cache_fields(data)), name)
        if len(source) == 0:
            raise ValueError(f"source {name!r} has no training examples")
        labels = getattr(source, "expression_labels", None)
        if labels is not None:
            logging.info("source %s: training images per expression: %s", name,
                         class_counts_line(labels))
        seed = shuffle_seed(config.seed, name)
        if data.sources[name].get("balance_expressions", False):
            datasets.append(_class_balanced(source, labels, seed))
        else:
            datasets.append(grain.MapDataset.source(source).seed(seed).shuffle().repeat())
        mix_weights.append(float(weights[k]))
    ds = grain.MapDataset.mix(datasets, weights=mix_weights)
    ds = _prepare(ds, data, aus)
    ds = _finish(ds.random_map(_augment(data.augment), seed=_augment_seed(config.seed)))
    ds = _ProcessRows(ds, data.global_batch_size, process_index, process_count)
    ds = ds.batch(batch_size, drop_remainder=True)[start_step:]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size))
    if data.num_workers > 0:
        # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers note what they read, so that one that dies is named with its record.
        board = workers.ReadingBoard(data.num_workers, data.read_threads)
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size),
            worker_init_fn=board.worker_init_fn(_leave_interrupts_to_the_main_process))
        return workers.WatchedIterator(iter(iter_ds), board)
    return iter(iter_ds)


def class_counts_line(labels: np.ndarray) -> str:
    """"Neutral 120, Anger 31, ..., no expression 12": a source's images per expression."""
    counts = np.bincount(labels[labels >= 0], minlength=schema.NUM_EXPRESSIONS)
    parts = [f"{name} {int(n)}" for name, n in zip(taxonomy.EXPRESSIONS, counts)]
    return ", ".join(parts + [f"no expression {int((labels < 0).sum())}"])


class _Rows(grain.sources.RandomAccessDataSource):
    """Rows `indices` of a source, as a source of their own (picklable for grain workers)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[int(self._indices[index])]


def _class_balanced(source, labels: np.ndarray, seed: int) -> grain.MapDataset:
    """`source` sampled so that every expression present is equally
    frequent among its expression-labelled images; images without an expression keep their
    share of the source. Each class is a shuffled, repeated stream of its own (so a rare class
    repeats more often within an epoch of the others), mixed with fixed weights: deterministic
    and checkpointable like the rest of the mixture.
    """
    rows = np.arange(len(source))
    groups = [rows[labels == c] for c in range(schema.NUM_EXPRESSIONS)]
    groups = [g for g in groups if len(g)]
    unlabelled = rows[labels < 0]
    labelled_share = 1.0 - len(unlabelled) / len(rows)
    streams, weights = [], []
    for k, rows in enumerate(groups + ([unlabelled] if len(unlabelled) else [])):
        stream_seed = int(np.random.SeedSequence([seed, k, 0xBA1]).generate_state(1)[0])
        streams.append(grain.MapDataset.source(_Rows(source, rows)).seed(stream_seed)
                       .shuffle().repeat())
        weights.append(labelled_share / len(groups) if k < len(groups) else 1 - labelled_share)
    return grain.MapDataset.mix(streams, weights=weights)


def _leave_interrupts_to_the_main_process(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker: Ctrl-C in a terminal reaches every process of the group, and
    a worker must not die of it while the main process saves a checkpoint and stops."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_iterator(iterator: grain.DatasetIterator) -> None:
    """Stops a train iterator's worker processes and frees their shared memory; idempotent.

    Batches from worker processes live in shared memory until the last reference to them goes;
    one still referenced when the interpreter exits makes Python's resource_tracker warn about
    "leaked shared_memory objects" (and clean them up).
    """
    iterator.close()


def source_counts(batch: dict[str, Any], num_sources: int) -> np.ndarray:
    """Examples per source in one batch (real rows only), for mixture logging.

    Sum it over the batches of a run to get the examples seen per source.
    """
    sources = np.asarray(batch[schema.SOURCE])
    if schema.VALID in batch:
        sources = sources[np.asarray(batch[schema.VALID]) > 0]
    return np.bincount(sources, minlength=num_sources)[:num_sources]


class EvalBatches:
    """This process's evaluation batches: every example of its shard once, then padding.

    `len()` is the number of batches, the same on every process (the largest shard decides), so
    a multi-host jit evaluation never waits on a process that has run out. Batches hold the
    train batch fields plus `valid` (float32 [b], 0 on padding rows and on dataset images that
    could not be decoded, which come as rows with key ""). A padding row is all
    zeros (image, labels, masks, and `source` 0) with key "", so per-source sums must be
    weighted by `valid`. Iterating again restarts from the first batch.

    Attributes:
      batch_size: rows per batch (eval_batch_size // process_count).
      num_examples: real examples this process holds.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, split: str, process_index: int,
                 process_count: int, sources: Sequence[str] | None = None):
        data = config.data
        self.batch_size = _per_process_batch(data.eval_batch_size, process_count,
                                             "config.data.eval_batch_size")
        self._data = data
        self._aus = taxonomy.check_au_list(data.aus)
        self._shards = []
        shard_sizes = np.zeros(process_count, np.int64)
        names = source_names(data)
        unknown = sorted(set(sources or ()) - set(names))
        if unknown:
            raise ValueError(f"no source named {', '.join(map(repr, unknown))}; the sources are "
                             f"{', '.join(names)}")
        for k, name in enumerate(names):
            if sources is not None and name not in sources:
                continue
            source = build_source(name, data.sources[name], split=split, aus=self._aus,
                                  source_index=k, **render_cache_fields(data))
            # Shard p of a source of n examples holds indices p, p + P, ...: len(range(p, n, P)).
            shard_sizes += [len(range(p, len(source), process_count))
                            for p in range(process_count)]
            shard = grain.MapDataset.source(source)[process_index::process_count]
            if len(shard):
                self._shards.append(shard)
        self.num_examples = int(shard_sizes[process_index])
        self._num_batches = int(math.ceil(shard_sizes.max() / self.batch_size))

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        emitted = 0
        padding_row = self._padding_row()
        if self._shards:
            ds = _finish(_prepare(grain.MapDataset.concatenate(self._shards), self._data,
                                  self._aus))
            ds = ds.batch(self.batch_size, drop_remainder=False)
            it = iter(ds.to_iter_dataset(grain.ReadOptions(
                num_threads=self._data.read_threads,
                prefetch_buffer_size=self._data.prefetch_buffer_size)))
            try:
                for batch in it:
                    yield _pad(batch, padding_row, self.batch_size)
                    emitted += 1
            finally:
                it.close()
        for _ in range(emitted, self._num_batches):
            yield _pad(None, padding_row, self.batch_size)

    def _padding_row(self) -> dict[str, Any]:
        """A masked-out example of the batch's structure: every label absent, image zeros."""
        size = self._data.image_size
        record = schema.make_record(np.zeros((size, size, 3), np.uint8), key="",
                                    num_aus=len(self._aus))
        row = schema.to_masks(record)
        row[schema.IMAGE] = np.zeros((size, size, 3), np.float32)
        return row


def _pad(batch: dict[str, Any] | None, padding_row: dict[str, Any],
         batch_size: int) -> dict[str, Any]:
    """Adds `valid` and pads `batch` (None: no real rows) to `batch_size` rows."""
    real = 0 if batch is None else len(batch[schema.SOURCE])
    missing = batch_size - real
    if missing == 0:
        out = dict(batch)  # a full batch needs no copy
    else:
        out = {}
        for field, value in padding_row.items():
            pad = np.repeat(np.asarray(value)[None], missing, axis=0)
            out[field] = pad if batch is None else np.concatenate([batch[field], pad])
    valid = np.arange(batch_size) < real
    if batch is not None:
        # A dataset image that could not be decoded comes as a row with key "" (sources'
        # unreadable="mask"): like padding, it is not scored.
        valid &= np.asarray(out[schema.KEY]) != ""
    out[schema.VALID] = valid.astype(np.float32)
    return out


def build_eval_batches(config: ml_collections.ConfigDict, *, split: str = "test",
                       sources: Sequence[str] | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> EvalBatches:
    """This process's evaluation batches over the sources' `split` (no shuffle, no augment).

    Every example of every source is in exactly one batch of exactly one process; each process
    gets `len()` batches of eval_batch_size // process_count rows, the last ones padded with
    `valid` = 0 rows. Sources are visited in `source_names` order.

    Args:
      config: the experiment config (`data` is read).
      split: the split every source provides for evaluation.
      sources: the names of the sources to read (default: all); each keeps its `source` index
        of `source_names`, so keys and per-source metrics do not depend on the selection.
      process_index: this process's shard; default `jax.process_index()`.
      process_count: number of shards; default `jax.process_count()`.

    Returns:
      An iterable of batch dicts with a `len()`.
    """
    process_index, process_count = _process_shard(process_index, process_count)
    return EvalBatches(config, split=split, process_index=process_index,
                       process_count=process_count, sources=sources)
