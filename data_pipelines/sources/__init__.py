"""Dataset sources: one module per published format, one entry point.

  source = get_source("rafdb", "/data/RAF-DB", "train")
  source[0]  # {"image": uint8 [H, W, 3], "expression": ..., "au": ..., "va": ..., "key": ...}

`get_source(name, root, split, **options)` reads the dataset's label files under `root` (the
folder its publisher ships, unpacked) and returns a grain random-access source of records
(docs/design.md#records). `split` is "train", "validation", "test" or "all", following each
dataset's own convention (see its module). Options common to every dataset:

  aus           the AU list records follow (default: the 17 of fbnet_jax.core.taxonomy.AUS)
  source_index  the `source` field of every record (the pipeline sets it)
  strict        stop at the first bad record instead of skipping and counting it
  margin        face crops are widened by this fraction of the face box on every side (0.2)
  unreadable    what an image that cannot be decoded becomes: "next", "mask" or "raise"
                (see base.FileSource)

and each dataset has options of its own (the keyword arguments of its module's `read`).

`get_source("prepared", DATA_DIR, split, dataset=NAME, **options)` reads the copy that
`fbnet prepare --dataset NAME --data_dir DATA_DIR` wrote (data_pipelines/tfds_builders/): the
same records, faces already cropped, from array_record files.
The records skipped while reading the labels, and why, are in `source.skips`
(`source.info().line()` is a one-line summary).

Adding a format: write `data_pipelines/sources/<name>.py` with
`read(root: Path, split: str, table: base.Table, **options) -> None` that appends one row per
face to `table` (skipping, with `table.skips.skip(reason, "file:line")`, every row it cannot label
exactly), and add the name to `DATASETS` (in `formats`).

Imports go one way (each imports only what comes before it): `base` (tables, skips, the file
source), the format modules, `formats` (`DATASETS`, `open_folder`), data_pipelines.tfds_builders
(which prepares dataset folders), `prepared` (which reads the result), and last this module,
whose `get_source` imports `prepared` (and with it TFDS) only when a preparation is asked for.
"""

from __future__ import annotations

import os

from data_pipelines.sources import formats
from data_pipelines.sources.base import BadRecordError, DatasetError, FileSource
from data_pipelines.sources.formats import DATASETS, reader, reader_options
from fbnet_jax.core import taxonomy

__all__ = ["BadRecordError", "DATASETS", "DatasetError", "FileSource", "get_source",
           "reader", "reader_options"]


def get_source(name: str, root: str | os.PathLike, split: str, *,
               aus=taxonomy.AUS, source_index: int = 0, strict: bool = False,
               margin: float = 0.2, unreadable: str = "next", allow_empty: bool = False,
               **options) -> FileSource:
    """A random-access source of dataset `name`'s `split` read from `root`.

    `allow_empty` (dataset folders only, for `fbnet prepare`): a split with no usable record
    is returned with 0 records instead of raising.

    Raises:
      DatasetError: an unknown dataset, split or option, label files that cannot be read
        (the message names the file and what was expected), or no usable record in the split.
      BadRecordError: with `strict`, the first record that cannot be read correctly.
    """
    if name == "prepared":
        if allow_empty:
            raise ValueError("allow_empty applies to dataset folders, not to a preparation")
        # Imported here: reading a preparation needs tensorflow_datasets.
        from data_pipelines.sources import prepared  # pylint: disable=g-import-not-at-top
        return prepared.open_prepared(root, split, aus=aus, source_index=source_index,
                                      margin=margin, **options)
    return formats.open_folder(name, root, split, aus=aus, source_index=source_index,
                               strict=strict, margin=margin, unreadable=unreadable,
                               allow_empty=allow_empty, **options)
