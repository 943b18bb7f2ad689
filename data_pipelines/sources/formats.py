"""The dataset formats: which module reads each dataset, its options, and reading a folder.

`DATASETS` maps every dataset name to the `read` function of its module (one module per
published format, imported when first used); `open_folder` reads a dataset's label files from
the folder its publisher ships and returns its records as a `base.FileSource`. This is what
`data_pipelines.sources.get_source` does for every name but "prepared", kept below the package's
entry point so that data_pipelines.tfds_builders, which prepares these folders, and
`data_pipelines.sources.prepared`, which reads the result, can use it.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

from data_pipelines.sources import base
from data_pipelines.sources.base import DatasetError, FileSource
from fbnet_jax.core import taxonomy

# name -> "module:function" (modules are imported when first used).
DATASETS = {
    "affectnet": "affectnet:read",
    "affwild2": "affwild2:read",
    "bp4d": "bp4d:read_bp4d",
    "bp4d_plus": "bp4d:read_bp4d_plus",
    "ckplus": "ckplus:read",
    "disfa": "disfa:read",
    "emotionet": "emotionet:read",
    "expw": "expw:read",
    "fer2013": "fer2013:read_fer2013",
    "ferplus": "fer2013:read_ferplus",
    "manifest": "manifest:read",
    "rafdb": "rafdb:read_basic",
    "rafdb_compound": "rafdb:read_compound",
}


def reader(name: str):
    """The `read` function of dataset `name`."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    module, function = DATASETS[name].split(":")
    return getattr(importlib.import_module(f"data_pipelines.sources.{module}"), function)


def reader_options(name: str) -> dict[str, Any]:
    """Dataset `name`'s own options and their defaults."""
    parameters = list(inspect.signature(reader(name)).parameters.values())[3:]
    return {p.name: p.default for p in parameters}


def open_folder(name: str, root: str | os.PathLike, split: str, *,
                aus=taxonomy.AUS, source_index: int = 0, strict: bool = False,
                margin: float = 0.2, unreadable: str = "next", allow_empty: bool = False,
                **options) -> FileSource:
    """A random-access source of dataset `name`'s `split` read from its folder `root`.

    The arguments are `get_source`'s; `allow_empty` (for `fbnet prepare`): a split with no
    usable record is returned with 0 records instead of raising.

    Raises:
      DatasetError: an unknown dataset, split or option, label files that cannot be read
        (the message names the file and what was expected), or no usable record in the split.
      BadRecordError: with `strict`, the first record that cannot be read correctly.
    """
    read = reader(name)
    known = reader_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in known.items()) or "none"
        raise DatasetError(f"{name}: unknown option(s) {', '.join(unknown)}; its options: "
                           f"{listed}")
    base.check_split(split, base.SPLITS, name)
    skips = base.Skips(f"{name}[{split}]", strict=strict)
    table = base.Table(skips)
    read(Path(root), split, table, **options)
    if not len(table) and not allow_empty:
        raise DatasetError(f"{name}: no usable record for split {split!r} under {root} "
                           f"({skips.summary()})")
    return FileSource(name, root, split, table, aus=aus, source_index=source_index,
                      margin=margin, unreadable=unreadable)
