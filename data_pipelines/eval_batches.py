"""Evaluation batches: every example of every source's split exactly once, then padding.

`build_eval_batches` visits the sources in `source_names` order, without shuffling or
augmentation, and pads so that no example is dropped and every process runs the same number of
steps. Evaluation batches need no closing: their grain iterator is closed when the loop over
them ends or the generator is discarded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines import batching, schema, source_build
from data_pipelines.source_config import render_cache_fields, source_names
from fbnet_jax.core import taxonomy


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
        self.batch_size = batching.per_process_batch(data.eval_batch_size, process_count,
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
            source = source_build.build_source(name, data.sources[name], split=split,
                                               aus=self._aus, source_index=k,
                                               **render_cache_fields(data))
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
            ds = _Batches([batching.prepare(shard, self._data, self._aus)
                           for shard in self._shards], self.batch_size)
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
        return schema.to_masks(record)


class _Batches(grain.MapDataset):
    """Batches of `batch_size` consecutive examples of `parents` taken one after another (the
    last batch shorter), each stacked by `batching.collate` from one batched read (`_getitems`)
    per parent it spans, so a source with a batched read of its own serves a batch's rows
    together."""

    def __init__(self, parents: Sequence[grain.MapDataset], batch_size: int):
        super().__init__(list(parents))
        self._batch_size = batch_size
        self._starts = np.cumsum([0] + [len(parent) for parent in parents]).tolist()

    def __len__(self) -> int:
        return math.ceil(self._starts[-1] / self._batch_size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            low = int(index) * self._batch_size
            high = min(low + self._batch_size, self._starts[-1])
            records = []
            for parent, start, end in zip(self.parents, self._starts, self._starts[1:]):
                if max(low, start) < min(high, end):
                    records += parent._getitems(  # pylint: disable=protected-access
                        list(range(max(low, start) - start, min(high, end) - start)))
            return self._stats.record_output_spec(batching.collate(records))

    def __str__(self) -> str:
        return f"_Batches({self._batch_size} examples of {len(self.parents)} shards)"


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
    process_index, process_count = batching.process_shard(process_index, process_count)
    return EvalBatches(config, split=split, process_index=process_index,
                       process_count=process_count, sources=sources)
