"""`affectnet`: AffectNet, either of its two releases (detected from what is under `root`).

The CSV release (full images, a face box and 68 landmarks per row):

  Manually_Annotated_file_lists/training.csv
  Manually_Annotated_file_lists/validation.csv
  Manually_Annotated_Images/<subdir>/<hash>.jpg          (subdir: an integer folder, e.g. 689/)

  Each list has the header
  subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,
  arousal
  (one line). `subDirectory_filePath` is relative to `Manually_Annotated_Images/`; the face box
  (x, y, width, height, in the image's pixels; x and y may be written as floats, `134.0`) becomes
  the crop box (x, y, x + width, y + height); `facial_landmarks` holds 136 numbers
  `x1;y1;x2;y2;...` (68 points, iBUG order) that level the eyes of the crop. An empty landmarks
  cell means none (the box alone is used); a cell that is not 136 numbers skips the row.
  The automatically annotated part (`Automatically_Annotated_*`) is not read.

The `.npy` release (224x224 face crops, no box):

  train_set/images/<N>.jpg                                (N: an integer id)
  train_set/annotations/<N>_exp.npy, <N>_val.npy, <N>_aro.npy, <N>_lnd.npy
  val_set/images/..., val_set/annotations/...

  Each `.npy` holds a 0-d array (a number, or the number written as a string). `_lnd.npy` is not
  used: the images are already crops. An id with a missing or unreadable `_exp`, `_val` or
  `_aro` file is skipped and counted.

Exactly one release must be under `root` (or one or two folders down); finding both, or neither,
raises `DatasetError`.

Splits: AffectNet has no public test set, so its official validation set (`validation.csv`,
`val_set/`) is the `test` split. `validation` is a seeded fraction (`validation_fraction`,
`seed`) of the training set and `train` the rest. AffectNet gives no subject ids, so this split
is by image (by `subDirectory_filePath`, or by the id N): a person with several images may be in
both. `all` is every row of both files.

Labels: the expression codes 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger
map to the project's order (Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise) as
[0, 4, 5, 6, 3, 2, 1]. Codes 7 Contempt, 8 None, 9 Uncertain and 10 No-Face have no class of the
7. A None row (a face showing none of AffectNet's expressions) still carries valid valence and
arousal, so by default it is kept with the expression missing (-1) and its valence/arousal
labels; with `keep_none_as_missing_expression=False` it is left out instead. Contempt rows are
left out by default; with `keep_contempt_as_missing_expression=True` they are kept like None
rows (the project has no Contempt class). Uncertain and No-Face rows are always left out. Rows
left out are counted apart, each code under its own reason (`Skips.drop`: AffectNet's own
labels, never a strict error). Valence and arousal are floats in [-1, 1]; -2 (the value of the
Uncertain and No-Face rows) means "not annotated": a pair with a -2 has no VA label. Any other
value outside [-1, 1], or NaN, skips the row; so does a code outside 0..10 or an empty face box.
A row kept with neither an expression nor valence/arousal is left out ("no label").
Keys are the image paths relative to `root`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_pipelines.sources import base

DATASET = "affectnet"
# AffectNet code -> index in taxonomy.EXPRESSIONS; codes 7..10 have no class.
_TO_C7 = (0, 4, 5, 6, 3, 2, 1)
CONTEMPT = 7
NONE = 8
_DROPPED = {7: "contempt", 8: "expression None", 9: "expression Uncertain", 10: "no face"}
VA_MISSING = -2.0
_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
            "facial_landmarks", "expression", "valence", "arousal")
_LISTS = "Manually_Annotated_file_lists"
_IMAGES = "Manually_Annotated_Images"
_NPY_MARKS = ("train_set/annotations", "val_set/annotations")
_NUM_LANDMARK_VALUES = 136


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    try:
        return base.find_file(root, names, DATASET, "release")
    except base.DatasetError:
        return None


def _release(root: Path) -> tuple[str, Path]:
    """("csv", the folder holding Manually_Annotated_file_lists) or ("npy", the folder holding
    train_set/val_set)."""
    if not root.is_dir():
        raise base.DatasetError(f"{DATASET}: root {root} is not a folder")
    lists = _find(root, (_LISTS,))
    npy = _find(root, _NPY_MARKS)
    looked = (f"{root / _LISTS} (the CSV release) and {root / _NPY_MARKS[0]} or "
              f"{root / _NPY_MARKS[1]} (the .npy release), also one and two folders down")
    if lists is not None and npy is not None:
        raise base.DatasetError(f"{DATASET}: found both releases under {root} ({lists} and "
                                f"{npy}); point root at one of them")
    if lists is None and npy is None:
        raise base.DatasetError(f"{DATASET}: found no release under {root}; looked for {looked}")
    if lists is not None:
        return "csv", lists.parent
    return "npy", npy.parent.parent


def _expression(value: object, keep_contempt: bool, keep_none: bool) -> int | str:
    """The project's expression index (-1 missing), or the skip reason."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "unknown expression code"
    if not (math.isfinite(number) and number == int(number) and 0 <= number <= 10):
        return "unknown expression code"
    code = int(number)
    if (code == CONTEMPT and keep_contempt) or (code == NONE and keep_none):
        return -1
    if code in _DROPPED:
        return _DROPPED[code]
    return _TO_C7[code]


def _report_code(table: base.Table, reason: str, where: str, detail: str) -> None:
    """Codes 7-10 are AffectNet's own classes outside the 7 (counted apart, never a strict
    error); any other unusable code is bad data."""
    (table.skips.drop if reason in _DROPPED.values() else table.skips.skip)(reason, where, detail)


def _labels(table: base.Table, where: str, code: object, valence: object, arousal: object,
            keep_contempt: bool, keep_none: bool, shown: str
            ) -> tuple[int, tuple[float, float] | None] | None:
    """(expression, VA) of a row, or None when the row is skipped or left out (counted);
    `shown` is the code as messages show it."""
    expression = _expression(code, keep_contempt, keep_none)
    if isinstance(expression, str):
        _report_code(table, expression, where, shown)
        return None
    try:
        return expression, _va(valence, arousal)
    except ValueError as e:
        table.skips.skip("bad valence/arousal", where, str(e))
        return None


def _va(valence: object, arousal: object) -> tuple[float, float] | None:
    """The (valence, arousal) pair, None when it carries the -2 marker.

    Raises:
      ValueError: a value is not a number, or neither -2 nor in [-1, 1].
    """
    values = (float(valence), float(arousal))
    if VA_MISSING in values:
        return None
    if not all(math.isfinite(v) and -1 <= v <= 1 for v in values):
        raise ValueError(f"valence/arousal {values} not in [-1, 1]")
    return values


def _check_images(folder: Path, table: base.Table) -> None:
    if table.check_files and not folder.is_dir():
        raise base.DatasetError(f"{DATASET}: the image folder {folder} does not exist")


def _csv_rows(path: Path):
    """(line number, {column: text}) or (line number, problem) for each row of a list file."""
    if not path.is_file():
        raise base.DatasetError(f"{DATASET}: {path} does not exist (expected the list "
                                f"{path.name} with header {','.join(_COLUMNS)})")
    return base.csv_rows(path, _COLUMNS)


def _read_csv(root: Path, release: Path, split: str, table: base.Table, *,
              validation_fraction: float, seed: int, keep_contempt: bool,
              keep_none: bool) -> None:
    images = release / _IMAGES
    _check_images(images, table)
    files = {"training.csv": split in ("train", "validation", "all"),
             "validation.csv": split in ("test", "all")}
    for name, wanted in files.items():
        if not wanted:
            continue
        path = release / _LISTS / name
        for number, row in _csv_rows(path):
            where = f"{path}:{number}"
            if isinstance(row, str):
                table.skips.skip("wrong number of fields", where, row)
                continue
            image = row["subDirectory_filePath"]
            if not image:
                table.skips.skip("no image path", where)
                continue
            if name == "training.csv" and split != "all":
                if base.subject_split(image, seed, validation_fraction, 0.0) != split:
                    continue
            labels = _labels(table, where, row["expression"], row["valence"], row["arousal"],
                             keep_contempt, keep_none, row["expression"])
            if labels is None:
                continue
            expression, va = labels
            try:
                x, y, w, h = (float(row[c]) for c in _COLUMNS[1:5])
                if not (math.isfinite(x + y + w + h) and w > 0 and h > 0):
                    raise ValueError(f"{(x, y, w, h)}")
            except ValueError as e:
                table.skips.skip("bad face box", where, str(e))
                continue
            landmarks = None
            if row["facial_landmarks"]:
                try:
                    values = [float(v) for v in row["facial_landmarks"].split(";")]
                except ValueError:
                    values = []
                if len(values) != _NUM_LANDMARK_VALUES or not all(map(math.isfinite, values)):
                    table.skips.skip("bad landmarks", where,
                                     f"expected {_NUM_LANDMARK_VALUES} numbers separated by ;")
                    continue
                landmarks = np.array(values, np.float32).reshape(-1, 2)
            if expression < 0 and va is None:
                table.skips.drop("no label", where)
                continue
            file = images / image
            table.add(file.relative_to(root).as_posix(), where=where, path=file,
                      expression=expression, va=va, box=(x, y, x + w, y + h),
                      landmarks=landmarks)


def _npy_value(path: Path) -> object:
    """The value of a one-element `.npy` file (a number or a string).

    Raises:
      ValueError: the file is not a one-element array.
      OSError: it cannot be read.
    """
    array = np.load(path, allow_pickle=False)
    if array.size != 1:
        raise ValueError(f"{array.size} values, expected 1")
    value = array.reshape(()).item()
    return value.decode() if isinstance(value, bytes) else value


def _id_order(name: str) -> tuple[bool, int, str]:
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def _read_npy(root: Path, release: Path, split: str, table: base.Table, *,
              validation_fraction: float, seed: int, keep_contempt: bool,
              keep_none: bool) -> None:
    folders = {"train_set": split in ("train", "validation", "all"),
               "val_set": split in ("test", "all")}
    for name, wanted in folders.items():
        if not wanted:
            continue
        annotations, images = release / name / "annotations", release / name / "images"
        if not annotations.is_dir():
            raise base.DatasetError(f"{DATASET}: {annotations} does not exist (expected "
                                    f"<N>_exp.npy, <N>_val.npy, <N>_aro.npy files)")
        _check_images(images, table)
        ids = sorted((p.name[:-len("_exp.npy")] for p in annotations.glob("*_exp.npy")),
                     key=_id_order)
        for image_id in ids:
            where = str(annotations / f"{image_id}_exp.npy")
            if name == "train_set" and split != "all":
                if base.subject_split(image_id, seed, validation_fraction, 0.0) != split:
                    continue
            values = {}
            for part in ("exp", "val", "aro"):
                path = annotations / f"{image_id}_{part}.npy"
                if not path.is_file():
                    break
                try:
                    values[part] = _npy_value(path)
                except (OSError, ValueError) as e:
                    values[part] = e
            if len(values) < 3:
                table.skips.skip("missing annotation file", where, f"{image_id}_{part}.npy")
                continue
            errors = [f"{image_id}_{k}.npy: {v}" for k, v in values.items()
                      if isinstance(v, Exception)]
            if errors:
                table.skips.skip("unreadable annotation file", where, "; ".join(errors))
                continue
            labels = _labels(table, where, values["exp"], values["val"], values["aro"],
                             keep_contempt, keep_none, repr(values["exp"]))
            if labels is None:
                continue
            expression, va = labels
            if expression < 0 and va is None:
                table.skips.drop("no label", where)
                continue
            file = images / f"{image_id}.jpg"
            table.add(file.relative_to(root).as_posix(), where=where, path=file,
                      expression=expression, va=va)


def read(root: Path, split: str, table: base.Table, *, validation_fraction: float = 0.05,
         seed: int = 0, keep_contempt_as_missing_expression: bool = False,
         keep_none_as_missing_expression: bool = True) -> None:
    """Appends AffectNet's rows of `split` to `table` (see the module docstring).

    Args:
      root: the folder holding one release (or one or two folders above it).
      split: train / validation (carved from the training set by image) / test (the official
        validation set) / all.
      table: where the rows go.
      validation_fraction: the fraction of training images that form `validation`.
      seed: the seed of that split.
      keep_contempt_as_missing_expression: keep Contempt rows, with no expression label but
        their valence/arousal, instead of leaving them out.
      keep_none_as_missing_expression: keep None rows (code 8), with no expression label but
        their valence/arousal (the default), instead of leaving them out.

    Raises:
      DatasetError: a keep_* option that is not True or False, no release or both under
        `root`, or a list file that cannot be read.
    """
    for name, value in (("keep_contempt_as_missing_expression",
                         keep_contempt_as_missing_expression),
                        ("keep_none_as_missing_expression", keep_none_as_missing_expression)):
        if not isinstance(value, bool):
            raise base.DatasetError(f"{DATASET}: option {name} must be True or False, got "
                                    f"{value!r}")
    root = Path(root)
    kind, release = _release(root)
    reader = _read_csv if kind == "csv" else _read_npy
    reader(root, release, split, table, validation_fraction=validation_fraction, seed=seed,
           keep_contempt=keep_contempt_as_missing_expression,
           keep_none=keep_none_as_missing_expression)
