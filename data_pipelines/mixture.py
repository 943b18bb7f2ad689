"""The training order: sources -> shuffle/repeat -> mix(weights) -> decode/resize -> batch.

`build_train_iterator` draws an endless stream of per-process batches from a weighted mixture
of sources; global batch n is a function of the config and n alone, whatever the number of
processes reading it. `source_counts` counts a batch's examples per source, for mixture
logging.

Closing: a train iterator with `config.data.num_workers > 0` owns worker processes and shared
memory. Close it when done, with `close_iterator(it)` in a `finally:` or with
`with contextlib.closing(build_train_iterator(config)) as it:`; closing twice is harmless.
(grain 0.2.18 iterators have `close()` but are not context managers.)
"""

from __future__ import annotations

import logging
import signal
import zlib
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from data_pipelines import batching, reading_board, schema, source_build, workers
from data_pipelines.reading_board import batched_read
from data_pipelines.source_config import render_cache_fields, source_names
from fbnet_jax.core import taxonomy


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


def shuffle_seed(seed: int, source_name: str) -> int:
    """The shuffle seed of one source: a stream of its own, derived from `seed` and its name.

    grain reshuffles each epoch with seed + epoch, so seeds that are neighbours (seed + k for the
    k-th source) would replay source k+1's order of epoch e as source k's order of epoch e+1.
    Hashing the name spreads the seeds over 2**32 values, and adding, removing or renaming a
    source leaves every other source's order as it was.
    """
    return int(np.random.SeedSequence(
        [seed, zlib.crc32(source_name.encode()), 0x5EED]).generate_state(1)[0])


class _ProcessBatches(grain.MapDataset):
    """This process's batches of `parent`, a stream of examples, each read with one batched call.

    Global batch n is elements [n·G, (n+1)·G) of the parent; process p of P reads rows
    [p·b, (p+1)·b) of it (b = G / P). So element n here is parent elements
    n·G + p·b + r for r in [0, b), and only the rows this process feeds are ever read or
    decoded. They are fetched together (`_getitems`, which grain passes down through the mixture,
    the shuffles and the maps to each source; a source with a batched read of its own serves
    them in one call) and stacked by `batching.collate`. Each example carries its row in the
    global batch (`schema.ROW`, p·b + r): with the step, it names the example's augmentation
    (`device_augment.example_keys`).
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        self._global_batch = global_batch
        self._rows = np.arange(process_index * (global_batch // process_count),
                               (process_index + 1) * (global_batch // process_count))
        self._length = len(parent) // global_batch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            first = int(index) * self._global_batch
            records = self._read([first + int(row) for row in self._rows])
            rows = [{**record, schema.ROW: np.int32(row)}
                    for record, row in zip(records, self._rows)]
            return self._stats.record_output_spec(batching.collate(rows))

    def _read(self, indices: list[int]) -> list:
        return self._parent._getitems(indices)  # pylint: disable=protected-access

    def __str__(self) -> str:
        return (f"_ProcessBatches(rows {self._rows[0]}-{self._rows[-1]} of every "
                f"{self._global_batch})")


def build_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                         process_count: int | None = None,
                         start_step: int = 0) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches from the weighted mixture.

    The data order is a function of the config and the step alone (docs/design.md#runtime): the
    sources, each shuffled with a new order every epoch, are mixed into one stream of examples
    and cut into global batches of `global_batch_size`. Process p of P reads rows [p·b, (p+1)·b)
    of each global batch (b = global_batch_size // P), and only those. So global batch n holds
    the same examples whether 1 or 64 processes read it, and a run can continue on another
    number of processes. The train step augments each example with a key from (seed, step, row),
    so the augmentation is a function of the step too.

    Batches are dicts of numpy arrays: `image` uint8 [b, H, W, 3] at the training size, `row`
    (int32 [b], the rows in the global batch), the fields of `schema.BATCH_LABEL_FIELDS`, and
    `key` (str [b]). The first batch is global batch
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
    process_index, process_count = batching.process_shard(process_index, process_count)
    batching.per_process_batch(data.global_batch_size, process_count,
                               "config.data.global_batch_size")
    aus = taxonomy.check_au_list(data.aus)
    weights = mixture_weights(data)
    datasets, mix_weights = [], []
    for k, name in enumerate(source_names(data)):
        if weights[k] == 0:  # not trained on; still evaluated, and keeps its index
            continue
        source = reading_board.Noted(source_build.build_source(
            name, data.sources[name], split="train", aus=aus, source_index=k,
            **render_cache_fields(data)), name)
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
    ds = _ProcessBatches(batching.prepare(ds, data, aus), data.global_batch_size, process_index,
                         process_count)[start_step:]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size))
    if data.num_workers > 0:
        # grain's worker processes read absl flags; outside absl.app.run they are unparsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers note what they read, so that one that dies is named with its record.
        board = reading_board.ReadingBoard(data.num_workers, data.read_threads)
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

    def _getitems(self, indices):
        return batched_read(self._source, [int(self._indices[i]) for i in indices])


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
