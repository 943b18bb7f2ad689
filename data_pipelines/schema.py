"""Records and batches: the contract between sources, transforms, the pipeline and the train step.

A source yields one record per face (`make_record` builds one, `validate_record` checks one):

  image       uint8 [H, W, 3] RGB                          never missing
  expression  int32 []   in 0..6                           MISSING_EXPRESSION (-1)
  au          int8  [A]  in {0, 1}, A = len(AU list)        MISSING_AU (-1) per unlabelled AU
  va          float32 [2] (valence, arousal) in [-1, 1]    NaN
  compound    int32 []   in 0..10 (RAF-DB compound order)   MISSING_COMPOUND (-1)
  source      int32 []   index of the source in the mixture
  key         str        original file / frame id

`to_masks` (applied to each batch as it is stacked) turns sentinels into value + mask, so a batch
holds `image` uint8 [B, H, W, 3] (the faces at the training size, as stored: the train step
augments and normalises them on the device, evaluation normalises them) and, per example, the
fields of `BATCH_LABEL_FIELDS`; a training batch also holds `row` (int32, each example's row in
its global batch, from which the step derives the example's augmentation key), an evaluation
batch `valid` (0 on padding rows) and `key`. Masked-out values are replaced by 0 so that no NaN
can reach a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fbnet_jax.core import taxonomy

IMAGE = "image"
EXPRESSION = "expression"
AU = "au"
VA = "va"
COMPOUND = "compound"
SOURCE = "source"
KEY = "key"
VALID = "valid"
ROW = "row"

MISSING_EXPRESSION = -1
MISSING_AU = -1
MISSING_COMPOUND = -1

NUM_EXPRESSIONS = len(taxonomy.EXPRESSIONS)
NUM_COMPOUNDS = len(taxonomy.RAF_COMPOUND_CLASSES)

# Numeric batch fields besides the image; `<name>_mask` marks which entries are labelled.
BATCH_LABEL_FIELDS = (
    "expression", "expression_mask", "au", "au_mask", "va", "va_mask", "compound",
    "compound_mask", "source")

Record = dict[str, Any]


def make_record(image: np.ndarray, *, key: str, source: int = 0, expression: int | None = None,
                au: np.ndarray | None = None, va: np.ndarray | None = None,
                compound: int | None = None, num_aus: int = len(taxonomy.AUS)) -> Record:
    """Builds a record, writing the sentinel for every label that is not given."""
    return {
        IMAGE: image,
        EXPRESSION: np.int32(MISSING_EXPRESSION if expression is None else expression),
        AU: (np.full(num_aus, MISSING_AU, np.int8) if au is None
             else np.asarray(au, np.int8)),
        VA: (np.full(2, np.nan, np.float32) if va is None else np.asarray(va, np.float32)),
        COMPOUND: np.int32(MISSING_COMPOUND if compound is None else compound),
        SOURCE: np.int32(source),
        KEY: str(key),
    }


def validate_record(record: Mapping[str, Any], num_aus: int = len(taxonomy.AUS)) -> None:
    """Raises ValueError naming the record's key and what is wrong with it."""
    key = record.get(KEY, "<no key>")

    def fail(what: str) -> None:
        raise ValueError(f"record {key!r}: {what}")

    for field in (IMAGE, EXPRESSION, AU, VA, COMPOUND, SOURCE, KEY):
        if field not in record:
            fail(f"missing field {field!r}")
    image = np.asarray(record[IMAGE])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        fail(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    expression = int(record[EXPRESSION])
    if not (expression == MISSING_EXPRESSION or 0 <= expression < NUM_EXPRESSIONS):
        fail(f"expression {expression} is outside 0..{NUM_EXPRESSIONS - 1} and not -1")
    au = np.asarray(record[AU])
    if au.shape != (num_aus,):
        fail(f"au must have shape ({num_aus},), got {au.shape}")
    if not np.isin(au, (MISSING_AU, 0, 1)).all():
        fail(f"au values must be 0, 1 or -1, got {sorted(set(au.tolist()))}")
    va = np.asarray(record[VA], np.float32)
    if va.shape != (2,):
        fail(f"va must have shape (2,), got {va.shape}")
    if np.isnan(va).any() and not np.isnan(va).all():
        fail(f"va must be labelled in both dimensions or neither, got {va.tolist()}")
    if not np.isnan(va).any() and (np.abs(va) > 1).any():
        fail(f"va must lie in [-1, 1], got {va.tolist()}")
    compound = int(record[COMPOUND])
    if not (compound == MISSING_COMPOUND or 0 <= compound < NUM_COMPOUNDS):
        fail(f"compound {compound} is outside 0..{NUM_COMPOUNDS - 1} and not -1")


def to_masks(record: Mapping[str, Any]) -> dict[str, Any]:
    """Turns the sentinels of one record, or of a batch of them (every field stacked along a
    leading axis), into (value, mask) pairs with safe values.

    Keeps only the batch fields: the image (passed through unchanged), `key`, `row` where
    present, and `BATCH_LABEL_FIELDS`.
    """
    expression = np.asarray(record[EXPRESSION], np.int32)
    au = np.asarray(record[AU])
    va = np.asarray(record[VA], np.float32)
    compound = np.asarray(record[COMPOUND], np.int32)
    expression_mask = expression != MISSING_EXPRESSION
    au_mask = au != MISSING_AU
    va_mask = ~np.isnan(va).any(axis=-1)
    compound_mask = compound != MISSING_COMPOUND
    out = {
        IMAGE: record[IMAGE],
        EXPRESSION: np.where(expression_mask, expression, 0).astype(np.int32),
        "expression_mask": expression_mask.astype(np.float32),
        AU: np.where(au_mask, au, 0).astype(np.float32),
        "au_mask": au_mask.astype(np.float32),
        VA: np.where(va_mask[..., None], va, 0).astype(np.float32),
        "va_mask": va_mask.astype(np.float32),
        COMPOUND: np.where(compound_mask, compound, 0).astype(np.int32),
        "compound_mask": compound_mask.astype(np.float32),
        SOURCE: np.asarray(record[SOURCE], np.int32),
        KEY: record[KEY],
    }
    if ROW in record:
        out[ROW] = np.asarray(record[ROW], np.int32)
    return out
