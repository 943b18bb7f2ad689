"""`bp4d`, `bp4d_plus`: BP4D and BP4D+ AU occurrence on their FACS-coded frames.

Layout (the AUCoding folder and the image folder may also sit one or two folders down)::

  root/                                       BP4D
    AUCoding/AU_OCC/F001_T1.csv ...           (some copies: AUCoding/AUCoding/F001_T1.csv)
    Sequences(2D+3D)/F001/T1/0643.jpg ...     (or `images_dir`)

  root/                                       BP4D+ (its RawData folder)
    AUCoding/AU_OCC/F001_T1.csv ...
    2D+3D/F001/T1/0643.jpg ...                each 2D+3D/F001.zip unzipped into 2D+3D/

Label files: one comma CSV per subject and task, `<Subj>_<Task>.csv` (other files are ignored),
with one header row and one row per coded frame; only a segment of each task is coded, so frame
numbers start mid-video. Column 0 is the frame number, and every other column is the AU that its
header cell names: the BP4D header is `0,1,2,...,99` (column N = AU N); the BP4D+ header names
the AUs (`1,1,2,4,5,...`, its frame column also reading `1`), so columns are taken by position,
never looked up by name. Values: 0 absent, 1 present, 9 not coded (that AU becomes -1). A row
with any other value, the wrong number of fields or an unreadable frame number is skipped, and
so is a row whose coded AUs of the model are all 9; all are counted. AUs outside the model's 17
are checked but not kept.

Coded AUs: BP4D's files code 12 AUs, 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23 and 24
(`taxonomy.DATASET_AUS["bp4d"]`, the FERA 2015 / ME-GraphAU set). Its header has a column for
every AU number 1..99 all the same, and a column nobody coded can hold 0, which is not a FACS
"absent": so every other AU of a BP4D row is missing (-1), whatever its column holds (its value
is still checked). BP4D+'s header names the AUs its files code, and all of them are kept.

Images: `<images>/<Subj>/<Task>/<frame>.jpg`, where the zero padding of the frame number differs
between subjects (BP4D: 4 digits for F001-F023 and M001-M008, 3 for M009-M018; BP4D+: 3 or 4;
ME-GraphAU's processed copy: none), so 4-digit, 3-digit and unpadded names are tried in that
order. `images_dir` (relative to `root` or absolute) overrides the image folder; by default it
is `Sequences(2D+3D)` (or `Sequences`) for BP4D and `2D+3D` for BP4D+. A subject of BP4D+ whose
folder is missing while its zip is there is an error (unzip it). Keys are
`<Subj>/<Task>/<frame>` with the frame number unpadded; the group is the subject.

Split:
  bp4d, option `fold`: None (default) assigns subjects to train / validation / test by a seeded
    hash of their id (`base.subject_split`; `validation_fraction` 0.1, `test_fraction` 0.1,
    `seed` 0); 1, 2 or 3 is the standard 3-fold subject partition (ME-GraphAU): fold 1 tests
    on part 3, fold 2 on part 2, fold 3 on part 1, and trains on the other two parts, of which
    a seeded `validation_fraction` of subjects is validation (`test_fraction` is not used). A
    subject outside the partition is then an error.
  bp4d_plus: no standard partition; always the seeded subject split above.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

from data_pipelines.sources import base
from data_pipelines.sources.disfa import fold_split
from fbnet_jax.core import taxonomy

# The standard 3-fold subject partition (ME-GraphAU tool/BP4D_image_label_process.py).
BP4D_PARTS = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016",
     "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020",
     "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017",
     "M015", "F014"),
)
# The AUs BP4D's AU_OCC files code; its other columns are never labels (module docstring).
BP4D_CODED_AUS = frozenset(taxonomy.DATASET_AUS["bp4d"])
LABEL_NAMES = ("AUCoding/AU_OCC/*_*.csv", "AUCoding/AUCoding/*_*.csv")
_FILE = re.compile(r"^(?P<subject>[A-Za-z]+\d+)_(?P<task>[A-Za-z]+\d+)\.csv$")
_CODES = {"0": 0, "1": 1, "9": -1}
_QUOTES = "'\" \t"


def _code(text: str) -> int | None:
    """0, 1 or -1 (coded 9) for an AU cell written as a number; None for anything else."""
    try:
        value = float(text.strip(_QUOTES))
    except ValueError:
        return None
    return {0.0: 0, 1.0: 1, 9.0: -1}.get(value)


def _label_files(root: Path, dataset: str) -> list[tuple[str, str, Path]]:
    """(subject, task, path) of every AU occurrence CSV, sorted."""
    first = base.find_file(root, LABEL_NAMES, dataset, "AU occurrence CSV (AU_OCC)")
    files = []
    for path in sorted(first.parent.glob("*.csv")):
        match = _FILE.match(path.name)
        if match:
            files.append((match["subject"], match["task"], path))
    return files


def _columns(path: Path, header: list[str]) -> dict[int, int]:
    """Column position -> AU, from the header cells after the frame column."""
    columns: dict[int, int] = {}
    for k, cell in enumerate(header[1:], 1):
        try:
            au = int(cell.strip(_QUOTES))
        except ValueError:
            raise base.DatasetError(
                f"{path}: header cell {k + 1} is {cell!r}; expected the frame column and then "
                f"AU numbers (BP4D: 0,1,2,...,99; BP4D+: the AU of each column)") from None
        if au in columns.values():
            raise base.DatasetError(f"{path}: two header columns name AU{au}")
        columns[k] = au
    if not columns:
        raise base.DatasetError(f"{path}: the header names no AU column (expected BP4D's "
                                f"0,1,2,...,99 or BP4D+'s AU numbers)")
    return columns


def _images_folder(root: Path, images_dir: str, defaults: Sequence[str], dataset: str) -> Path:
    """`images_dir` (relative to `root` or absolute), or the first of `defaults` found."""
    if images_dir:
        folder = root / images_dir
        if not folder.is_dir():
            raise base.DatasetError(f"{dataset}: image folder {folder} is not a folder")
        return folder
    return base.find_file(root, defaults, dataset, "image folder (or set images_dir)")


def _read_file(path: Path, subject: str, task: str, images: Path, table: base.Table,
               dataset: str, coded: Collection[int] | None) -> None:
    """Appends the coded frames of one subject and task; only the AUs of `coded` (None: every
    AU of the header) are labelled."""
    lines = base.read_lines(path)
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        raise base.DatasetError(f"{path}: empty file (expected a header row and one row per "
                                f"coded frame)")
    columns = _columns(path, header)
    kept = [(k, au) for k, au in columns.items()
            if au in taxonomy.AUS and (coded is None or au in coded)]
    folder = images / subject / task
    if not folder.is_dir() and (images / f"{subject}.zip").is_file():
        raise base.DatasetError(f"{dataset}: {images / subject} is missing but "
                                f"{images / subject}.zip is there: unzip it into {images}")
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    for number, cells in enumerate(reader, 2):
        if not cells or not any(c.strip() for c in cells):
            continue
        where = f"{path}:{number}"
        if len(cells) != len(header):
            table.skips.skip("wrong number of fields", where,
                             f"{len(cells)} fields, the header has {len(header)}")
            continue
        try:
            frame = int(cells[0].strip(_QUOTES))
        except ValueError:
            frame = -1
        if frame < 0:
            table.skips.skip("unreadable frame number", where, cells[0])
            continue
        if set(cells[1:]) <= _CODES.keys():  # the common case, checked at C speed
            au = base.au_vector({au: _CODES[cells[k]] for k, au in kept})
        else:
            codes = {k: _code(cells[k]) for k in columns}
            wrong = next((k for k, code in codes.items() if code is None), None)
            if wrong is not None:
                table.skips.skip("AU value not 0, 1 or 9", where,
                                 f"AU{columns[wrong]} is {cells[wrong]!r}")
                continue
            au = base.au_vector({au: codes[k] for k, au in kept})
        if (au < 0).all():
            table.skips.skip("no AU label", where, "no AU of the model is coded")
            continue
        candidates = (f"{frame:04d}.jpg", f"{frame:03d}.jpg", f"{frame}.jpg")
        name = next((n for n in candidates if n in names), candidates[0])
        table.add(f"{subject}/{task}/{frame}", where=where, path=folder / name, au=au,
                  group=subject)


def _read(root: Path, split: str, table: base.Table, *, dataset: str, images_dir: str,
          default_images: Sequence[str], parts: Sequence[Sequence[str]], fold: int | None,
          validation_fraction: float, test_fraction: float, seed: int,
          coded: Collection[int] | None) -> None:
    files = _label_files(root, dataset)
    images = _images_folder(root, images_dir, default_images, dataset)
    for subject, task, path in files:
        part = fold_split(subject, parts, fold, seed, validation_fraction, test_fraction,
                          dataset)
        if split in ("all", part):
            _read_file(path, subject, task, images, table, dataset, coded)


def read_bp4d(root: Path, split: str, table: base.Table, *, images_dir: str = "",
              fold: int | None = None, validation_fraction: float = 0.1,
              test_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends the BP4D frames of `split` to `table` (see the module docstring).

    Raises:
      DatasetError: no AU_OCC CSV or image folder, a header that names no AUs, a bad `fold`,
        or (with a fold) a subject outside the partition.
    """
    _read(root, split, table, dataset="bp4d", images_dir=images_dir,
          default_images=("Sequences(2D+3D)", "Sequences"), parts=BP4D_PARTS, fold=fold,
          validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed,
          coded=BP4D_CODED_AUS)


def read_bp4d_plus(root: Path, split: str, table: base.Table, *, images_dir: str = "",
                   validation_fraction: float = 0.1, test_fraction: float = 0.1,
                   seed: int = 0) -> None:
    """Appends the BP4D+ frames of `split` to `table` (see the module docstring).

    Raises:
      DatasetError: no AU_OCC CSV or image folder, a header that names no AUs, or a subject
        still zipped.
    """
    _read(root, split, table, dataset="bp4d_plus", images_dir=images_dir,
          default_images=("2D+3D",), parts=(), fold=None,
          validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed,
          coded=None)
