"""What training and evaluation batches share: this process's share, and the fixed transforms.

Each process reads `global batch // process count` rows of every batch (`process_shard`,
`per_process_batch`); every example is decoded and resized (`prepare`), and each batch is
stacked with its label masks (`collate`). Images stay uint8 at the training size: augmentation
and normalisation run on the device, in the train step (data_pipelines/device_augment.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines import schema, transforms


def process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in the JAX process index/count where not given, and checks them."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  # only the defaults need JAX
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                         f"{process_index}, process_count={process_count}")
    return int(process_index), int(process_count)


def per_process_batch(global_batch: int, process_count: int, what: str) -> int:
    """The rows of a `global_batch` that each of `process_count` processes reads (`what`: the
    config field, for the message)."""
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"{what} ({global_batch}) must be a positive multiple of the process "
                         f"count ({process_count})")
    return global_batch // process_count


def prepare(ds: grain.MapDataset, data_config: ml_collections.ConfigDict,
            aus: Sequence[int]) -> grain.MapDataset:
    """Decode and resize, plus schema checks when `validate_records` is set."""
    ds = ds.map(transforms.DecodeImage()).map(transforms.ResizeImage(data_config.image_size))
    if data_config.validate_records:
        ds = ds.map(transforms.ValidateRecord(len(aus)))
    return ds


def collate(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Records -> one batch: the batch fields stacked, sentinels turned into (value, mask) pairs
    (`schema.to_masks`, vectorised over the batch); the images stay uint8.

    The `batch_fn` of every training and evaluation batch. Only the fields a batch holds are
    stacked (a source's other fields are dropped here).
    """
    fields = _STACKED + ((schema.ROW,) if schema.ROW in records[0] else ())
    stacked = {field: np.stack([record[field] for record in records]) for field in fields}
    stacked[schema.KEY] = np.array([record[schema.KEY] for record in records], dtype=str)
    return schema.to_masks(stacked)


_STACKED = (schema.IMAGE, schema.EXPRESSION, schema.AU, schema.VA, schema.COMPOUND,
            schema.SOURCE)
