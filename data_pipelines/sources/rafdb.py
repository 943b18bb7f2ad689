"""`rafdb` and `rafdb_compound`: RAF-DB, the basic (7 expressions) and compound (11 classes) sets.

`root` is the folder of one set as distributed (the zips extracted in place), or a folder above
it: the label file is searched one and two folders down too, and a folder holding both sets is
read as `basic/` by `rafdb` and as `compound/` by `rafdb_compound`:

  basic/                                   (or compound/: the same layout)
    EmoLabel/list_patition_label.txt       the label file; the real name has the "patition"
                                           misspelling, the README's list_partition_label.txt
                                           is accepted too
    Image/aligned/train_00001_aligned.jpg  100x100 faces aligned on the eyes and mouth
    Image/original/train_00001.jpg         the full images
    Annotation/boundingbox/train_00001_boundingbox.txt   "x0 y0 x1 y1 " in original pixels

Label file: one line per image, `<image name> <label>` (`train_00001.jpg 5`), no header. Basic
labels 1..7 are 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral and
are mapped onto the project's order (docs/datasets.md#mapping-to-the-7-expressions). Compound
labels 1..11 are stored in the record's `compound` field as label - 1, in
taxonomy.RAF_COMPOUND_CLASSES order (1 Happily Surprised ... 11 Disgustedly Surprised); compound
rows have no basic expression.

Splits: the official train and test sets, from the image name's prefix (`train_` / `test_`).
RAF-DB has no validation set and no subject ids, so "validation" is carved from the official
train set by image (a seeded hash of the image name; option `validation_fraction`, `seed`), and
"train" is the rest of it; the same person may appear in both. "all" is every image.

Options:
  images               "aligned" (default): the aligned 100x100 faces, used as they are;
                       "original": the full images, cropped with the face box of
                       Annotation/boundingbox/ where the image has one, else used whole.
  validation_fraction  the fraction of the official train images that forms "validation" (0.1).
  seed                 the seed of that split (0).
"""

from __future__ import annotations

import math
from pathlib import Path

from data_pipelines.sources import base

_LABEL_FILES = ("EmoLabel/list_patition_label.txt", "EmoLabel/list_partition_label.txt")
# Raw basic label 1..7 -> index into taxonomy.EXPRESSIONS
# (docs/datasets.md#mapping-to-the-7-expressions).
_BASIC_TO_C7 = {1: 6, 2: 3, 3: 2, 4: 4, 5: 5, 6: 1, 7: 0}
_NUM_COMPOUND = 11
_PREFIX_SPLIT = (("train_", "train"), ("test_", "test"))


def _label_file(root: Path, folder: str, other: str, dataset: str) -> Path:
    """The set's label file: `<folder>/EmoLabel/...` first, else any copy not inside `other`."""
    names = tuple(f"{folder}/{n}" for n in _LABEL_FILES) + _LABEL_FILES
    path = base.find_file(root, names, dataset, f"RAF-DB {folder} label file")
    inside = [part.lower() for part in path.relative_to(root).parts]
    if other in inside:
        raise base.DatasetError(
            f"{dataset}: the only label file under {root} is {path}, which belongs to the RAF-DB "
            f"{other} set; point root at the {folder} set")
    return path


def _face_box(path: Path) -> tuple[float, float, float, float]:
    """The box of a `<stem>_boundingbox.txt` file: one line `x0 y0 x1 y1` (trailing space)."""
    fields = " ".join(base.read_lines(path)).split()
    if len(fields) != 4:
        raise ValueError(f"{len(fields)} numbers, expected 4")
    box = tuple(float(v) for v in fields)
    if not all(math.isfinite(v) for v in box) or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"box {box} is empty or not finite")
    return box


def _read(root: Path, split: str, table: base.Table, *, compound: bool, images: str,
          validation_fraction: float, seed: int) -> None:
    dataset = "rafdb_compound" if compound else "rafdb"
    if images not in ("aligned", "original"):
        raise base.DatasetError(f"{dataset}: images must be 'aligned' or 'original', got "
                                f"{images!r}")
    root = Path(root)
    folder, other = ("compound", "basic") if compound else ("basic", "compound")
    labels = _label_file(root, folder, other, dataset)
    set_dir = labels.parent.parent
    image_dir = base.find_file(set_dir, (f"Image/{images}",), dataset,
                               f"{images} image folder")
    box_dir = set_dir / "Annotation" / "boundingbox"
    if images == "original" and not box_dir.is_dir():
        base.log.warning("%s: no face boxes (%s is not a folder): the original images are used "
                         "whole", dataset, box_dir)
    for number, line in enumerate(base.read_lines(labels), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{labels}:{number}"
        if len(fields) != 2:
            table.skips.skip("wrong number of fields", where, f"{len(fields)} fields, expected 2")
            continue
        name, code = fields
        row_split = next((s for prefix, s in _PREFIX_SPLIT if name.startswith(prefix)), None)
        if row_split is None:
            table.skips.skip("unknown split prefix", where, name)
            continue
        if row_split == "train":
            row_split = base.subject_split(name, seed, validation_fraction, 0.0)
        if split not in ("all", row_split):
            continue
        raw = int(code) if code.isascii() and code.isdigit() else -1
        if compound:
            if not 1 <= raw <= _NUM_COMPOUND:
                table.skips.skip("unknown compound code", where, code)
                continue
            expression, compound_class = -1, raw - 1
        else:
            if raw not in _BASIC_TO_C7:
                table.skips.skip("unknown expression code", where, code)
                continue
            expression, compound_class = _BASIC_TO_C7[raw], -1
        stem = Path(name).stem
        box = None
        if images == "aligned":
            path = image_dir / f"{stem}_aligned.jpg"
        else:
            path = image_dir / name
            box_file = box_dir / f"{stem}_boundingbox.txt"
            if box_file.is_file():
                try:
                    box = _face_box(box_file)
                except ValueError as e:
                    table.skips.skip("unreadable face box", f"{box_file}:1", str(e))
                    continue
        table.add(path.relative_to(root).as_posix(), where=where, path=path,
                  expression=expression, compound=compound_class, box=box)


def read_basic(root: Path, split: str, table: base.Table, *, images: str = "aligned",
               validation_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends the RAF-DB basic set's images of `split` to `table` (see the module docstring)."""
    _read(root, split, table, compound=False, images=images,
          validation_fraction=validation_fraction, seed=seed)


def read_compound(root: Path, split: str, table: base.Table, *, images: str = "aligned",
                  validation_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends the RAF-DB compound set's images of `split` to `table` (`compound` labels only)."""
    _read(root, split, table, compound=True, images=images,
          validation_fraction=validation_fraction, seed=seed)
