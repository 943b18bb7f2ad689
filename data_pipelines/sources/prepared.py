"""`prepared`: a dataset's faces as `fbnet prepare` wrote them (TFDS array_record), no TensorFlow.

  source = open_prepared("/data/prepared", "train", dataset="affwild2", task="va")
  source[0]  # the same record as get_source("affwild2", root, "train", task="va")[0]

`data_dir` is the folder `fbnet prepare --data_dir` wrote to; `dataset` and its options (the
dataset's own options, `margin` and `image_size`, defaults where not given) pick the
preparation, at `<data_dir>/<dataset>_faces/<config>/<version>` (see
data_pipelines.tfds_builders.faces). Records follow docs/design.md#records and are the source's
readable records in its order, with the same images: faces were cropped and aligned when
prepared and stored losslessly (with `image_size=N`: resized to N x N as the pipeline resizes,
stored as raw uint8, read from each record's bytes without TFDS's decoder, labels from the
preparation's label columns; grain's batched read `_getitems` serves a batch's rows). Images that
could not be read were left out when preparing (`source.skips` holds the preparation's counts),
so reading never meets one. Splits: train, validation and test; one that the preparation left
empty (no usable record fell in it) raises `DatasetError` saying why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from data_pipelines import schema
from data_pipelines.sources import base
from data_pipelines.tfds_builders import faces, prepare
from fbnet_jax.core import taxonomy


def open_prepared(data_dir: str | os.PathLike, split: str, *, dataset: str,
                  aus: Sequence[int] = taxonomy.AUS, source_index: int = 0,
                  **options: Any) -> PreparedSource:
    """The prepared `split` of `dataset` with `options` under `data_dir`.

    Raises:
      DatasetError: an unknown dataset, option or split, or no such preparation (the message
        names the folder looked in and the `fbnet prepare` command that would write it).
    """
    base.check_split(split, faces.SPLITS, f"prepared {dataset}")
    directory = faces.prepared_dir(data_dir, dataset, options)
    if not faces.is_prepared(directory):
        raise base.DatasetError(_missing(data_dir, dataset, options, directory))
    metadata = faces.read_metadata(directory)
    return PreparedSource(directory, dataset, split, metadata, aus=aus,
                          source_index=source_index)


def _missing(data_dir: str | os.PathLike, dataset: str, options: dict[str, Any],
             directory: Path) -> str:
    builder_dir = directory.parent.parent
    found = sorted(p.name for p in builder_dir.iterdir()
                   if p.is_dir() and not p.name.startswith(".")) if builder_dir.is_dir() else []
    there = f" (prepared there: {', '.join(found)})" if found else ""
    resolved = json.dumps(faces.resolve_options(dataset, options), sort_keys=True)
    return (f"{dataset}: not prepared with options {resolved}: no preparation in "
            f"{directory}{there}; write it with: "
            f"{prepare.prepare_command(data_dir, dataset, options)}")


class PreparedSource:
    """A grain random-access source over one split of a preparation.

    Picklable (for grain's worker processes): the array_record files are opened again in the
    process that reads them. `expression_labels` and `labels(index)` read the preparation's
    label columns, not the images.
    """

    def __init__(self, directory: str | os.PathLike, dataset: str, split: str,
                 metadata: dict[str, Any], *, aus: Sequence[int] = taxonomy.AUS,
                 source_index: int = 0):
        self.name, self.root, self.split = dataset, os.fspath(directory), split
        self.options = dict(metadata["options"])
        self.aus = tuple(int(a) for a in aus)
        self.source_index = int(source_index)
        self.skips = base.Skips(f"{dataset}[{split}]")
        self.skips.counts.update(metadata["skipped"][split])
        self.skips.first.update(metadata["first_skipped"][split])
        self.skips.dropped.update(metadata.get("dropped", {}).get(split, {}))
        self.skips.noted.update(metadata.get("noted", {}).get(split, {}))
        self._length = int(metadata["records"][split])
        if not self._length:
            why = faces.empty_reason(metadata, split)
            raise base.DatasetError(
                f"{dataset}: split {split!r} of the preparation in {self.root} is empty: {why}. "
                f"A run cannot train or evaluate on it; prepare {dataset} again with other "
                f"split options to fill it, or leave this split out")
        # Raw uint8 faces of this side (`image_size` option), or 0: PNG faces, decoded by TFDS.
        self._size = int(self.options.get("image_size", 0) or 0)
        self._examples = None
        self._labels = None
        self._data()

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (f"PreparedSource({self.name!r}, split={self.split!r}, root={self.root!r}, "
                f"{len(self)} records)")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_examples"] = state["_labels"] = None
        return state

    def _data(self):
        if self._examples is None:
            examples = tfds.builder_from_directory(self.root).as_data_source(split=self.split)
            if len(examples) != self._length:
                raise base.DatasetError(f"{self.root}: split {self.split!r} holds "
                                        f"{len(examples)} records, its metadata says "
                                        f"{self._length}; prepare it again")
            self._examples = examples
        return self._examples

    def _columns(self) -> dict[str, np.ndarray]:
        if self._labels is None:
            path = Path(self.root) / faces.labels_file(self.split)
            with np.load(path, allow_pickle=False) as data:
                columns = {name: data[name] for name in data.files}
            columns["au"] = base.project_aus(columns["au"], self.aus)
            self._labels = columns
        return self._labels

    @property
    def expression_labels(self) -> np.ndarray:
        """int32 [N]: every record's expression (-1 missing), for class counts and balancing."""
        return self._columns()["expression"]

    def labels(self, index: int) -> schema.Record:
        """Record `index` without its image (no image is read): for label statistics."""
        row = int(index) % len(self)
        columns = self._columns()
        return {schema.KEY: columns["key"][row].decode(),
                schema.EXPRESSION: np.int32(columns["expression"][row]),
                schema.AU: columns["au"][row], schema.VA: columns["va"][row],
                schema.COMPOUND: np.int32(columns["compound"][row]),
                schema.SOURCE: np.int32(self.source_index)}

    def info(self) -> base.SourceInfo:
        return base.SourceInfo(self.name, self.split, self.root, len(self), self.skips)

    def __getitem__(self, index: int) -> schema.Record:
        row = int(index) % len(self)
        if self._size:  # raw uint8 faces: the image's bytes from the record, labels from columns
            return {schema.IMAGE: self._raw_image(row), **self.labels(row)}
        return self.decoded(row)

    def decoded(self, row: int) -> schema.Record:
        """Record `row` as TFDS's decoder reads it, every feature of it (what PNG faces are
        read with; raw uint8 faces are read faster from the same bytes)."""
        example = self._read(row, lambda: self._data()[row])
        key = example["key"]
        va = np.asarray(example["va"], np.float32)
        return schema.make_record(
            np.asarray(example["image"], np.uint8),
            key=key.decode() if isinstance(key, bytes) else str(key), source=self.source_index,
            expression=int(example["expression"]),
            au=base.project_aus(np.asarray(example["au"], np.int8), self.aus),
            va=None if np.isnan(va).any() else va, compound=int(example["compound"]),
            num_aus=len(self.aus))

    def _getitems(self, indices: Sequence[int]) -> list[schema.Record]:
        """Records `indices` (grain's batched read): the labels of all of them taken from the
        columns at once."""
        rows = np.asarray(indices, np.int64) % len(self)
        if not self._size:
            return [self[row] for row in rows]
        columns = self._columns()
        keys = columns["key"][rows]
        expression = columns["expression"][rows].astype(np.int32)
        au, va = columns["au"][rows], columns["va"][rows]
        compound = columns["compound"][rows].astype(np.int32)
        source = np.int32(self.source_index)
        return [{schema.IMAGE: self._raw_image(int(row)), schema.KEY: keys[j].decode(),
                 schema.EXPRESSION: expression[j], schema.AU: au[j], schema.VA: va[j],
                 schema.COMPOUND: compound[j], schema.SOURCE: source}
                for j, row in enumerate(rows)]

    def _read(self, row: int, read: Callable[[], Any]) -> Any:
        """`read()` of record `row`; a record file that cannot be read (damaged, truncated) is a
        `DatasetError` naming the preparation, the record and what array_record found."""
        try:
            return read()
        except RuntimeError as e:  # array_record's error for a damaged file
            found = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise base.DatasetError(
                f"{self.root}: record {row} of split {self.split!r} cannot be read: {found}; "
                f"the record files are damaged: delete {self.root} and prepare it again") from e

    def _raw_image(self, row: int) -> np.ndarray:
        """Record `row`'s face, uint8 [S, S, 3], read from its `tf.train.Example` without TFDS's
        generic decoder (which converts every feature of the record, ~6x the cost)."""
        example = tf_example_pb2.Example.FromString(
            self._read(row, lambda: self._data().data_source[row]))
        values = example.features.feature["image"].bytes_list.value
        size = self._size
        if len(values) != 1 or len(values[0]) != size * size * 3:
            found = f"{len(values[0])} bytes" if len(values) == 1 else f"{len(values)} values"
            raise base.DatasetError(
                f"{self.root}: record {row} of split {self.split!r} holds an image of {found}, "
                f"not the {size}x{size}x3 uint8 bytes of this preparation; prepare it again")
        return np.frombuffer(values[0], np.uint8).reshape(size, size, 3)
