"""`expw`: ExpW (Expression in-the-Wild), faces in full scene images, one label per face.

`root` is the dataset folder (searched one and two folders down too):

  label/label.lst            one line per face
  image/origin/<name>.jpg    the full images; an image may hold several faces

`label.lst` lines have 8 space-separated fields:
`image_name face_id face_box_top face_box_left face_box_right face_box_bottom face_box_confidence
expression_label`, e.g. `angry_actor_104.jpg 0 28 113 226 141 22.9362 0`. Mind the box order:
top, left, right, bottom (y0, x0, x1, y1); the face is cropped with it. Labels 0..6 are 0 angry,
1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral, mapped onto the project's order.
Keys are `<image name>/<face id>`.

Splits: ExpW has none and no subject ids, so images are split by a seeded hash of the image
name: every face of an image is in the same split (options `validation_fraction`,
`test_fraction`, `seed`). "all" is every face.

Options:
  min_confidence       faces whose box confidence is below it are left out of every split,
                       like faces of another split (not counted as skipped records; their
                       number is logged); the default 0 keeps every face.
  validation_fraction  the fraction of images in "validation" (0.1).
  test_fraction        the fraction of images in "test" (0.1).
  seed                 the seed of the split (0).
"""

from __future__ import annotations

import math
from pathlib import Path

from data_pipelines.sources import base

# ExpW label 0..6 -> index into taxonomy.EXPRESSIONS
# (docs/datasets.md#mapping-to-the-7-expressions).
_EXPW_TO_C7 = (1, 2, 3, 4, 5, 6, 0)
_FIELDS = 8


def read(root: Path, split: str, table: base.Table, *, min_confidence: float = 0.0,
         validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends ExpW's faces of `split` to `table` (see the module docstring)."""
    root = Path(root)
    labels = base.find_file(root, ("label/label.lst",), "expw", "ExpW label file")
    image_dir = base.find_file(labels.parent.parent, ("image/origin",), "expw",
                               "ExpW image folder")
    below = 0
    for number, line in enumerate(base.read_lines(labels), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{labels}:{number}"
        if len(fields) != _FIELDS:
            table.skips.skip("wrong number of fields", where,
                             f"{len(fields)} fields, expected {_FIELDS}")
            continue
        name, face_id, code = fields[0], fields[1], fields[7]
        if split not in ("all", base.subject_split(name, seed, validation_fraction,
                                                   test_fraction)):
            continue
        if not (code.isascii() and code.isdigit() and int(code) < len(_EXPW_TO_C7)):
            table.skips.skip("unknown expression code", where, code)
            continue
        try:
            top, left, right, bottom, confidence = (float(v) for v in fields[2:7])
        except ValueError:
            table.skips.skip("unreadable face box", where, " ".join(fields[2:7]))
            continue
        if not (all(math.isfinite(v) for v in (top, left, right, bottom, confidence))
                and right > left and bottom > top):
            table.skips.skip("unreadable face box", where,
                             f"top {top}, left {left}, right {right}, bottom {bottom}, "
                             f"confidence {confidence}")
            continue
        if min_confidence > 0 and confidence < min_confidence:
            below += 1
            continue
        table.add(f"{name}/{face_id}", where=where, path=image_dir / name,
                  expression=_EXPW_TO_C7[int(code)], box=(left, top, right, bottom), group=name)
    if below:
        base.log.info("expw[%s]: left out %d face(s) with a box confidence below %s", split,
                      below, min_confidence)
