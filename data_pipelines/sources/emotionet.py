"""`emotionet`: EmotioNet AU labels (either published label format), images found by file name.

EmotioNet is distributed as image URLs with AU labels; the images are downloaded by the user.
Two label formats are read (the format of each file is recognised from its first line):

* The 24,600 manually FACS-coded images, `EmotioNet_FACS_aws_2020_24600.csv`: a comma CSV
  with a header. The columns `URL` (the image) and `URL orig` are followed by AU columns whose
  names carry spaces and quotes (`AU 1`, `'AU 1'`, `"AU 1"` and `AU1` are all read as AU1);
  URL cells may be wrapped in quotes (`'http://.../N_0000000001_00001.jpg'`). Other columns
  are ignored.
* The original per-chunk lists (`dataFile_1001.txt`, ... in
  `emotioNet_challenge_files_server_challenge_1.2_aws/`): tab-separated, no header, 62 fields
  a line: `url`, `orig_url`, `AU1` ... `AU60`.

AU values are 0 (absent), 1 (present) or 999 (not coded: that AU becomes -1). A line with
another value, the wrong number of fields or no URL is skipped; so is a line whose 17 AUs of
the model are all not coded. AUs outside the model's 17 are checked but not kept.

Layout (`root`; the label files may also sit one or two folders down)::

  root/
    EmotioNet_FACS_aws_2020_24600.csv                 the manual set, or
    emotioNet_challenge_files_server_challenge_1.2_aws/dataFile_1001.txt ...   the lists
    images/ ...                                       the downloaded images, any sub-folders

Images are found by the file name at the end of the label's `URL`
(`N_0000000001_00001.jpg`), searched in every folder under `images_dir` (default: `root`
itself), since downloaded copies are flattened or nested in different ways. A label whose
image is not there is skipped and counted ("image file not found"); a file name found in two
places is ambiguous and its label is skipped too (point `images_dir` at one copy). Keys are the
image path relative to the searched folder.

Options:
  labels: which label files to read. "auto" (default): the 24,600-image CSV if there is one,
    else the tab lists; "manual": the CSV; "lists": every `dataFile_*.txt` of the lists'
    folder; any other text is a glob (relative to `root`, or absolute) of label files in
    either format. The lists are automatically annotated (EmotioNet's own AU detector, not
    FACS coders), so when "auto" falls back to them the read logs a warning and counts every
    row it keeps under `AUTOMATIC` in `source.skips.noted`, which the source's summary and
    `fbnet prepare`'s report print ("noted: ..."); "lists" chooses them without either.
  images_dir: the folder searched for images, relative to `root` or absolute ("" = `root`).
  validation_fraction, test_fraction, seed: the split (below).

Split: EmotioNet has no public split, and its labels name no subject, so images (not
subjects) are assigned to train / validation / test by a seeded hash of the image file name
(`base.subject_split`): `validation_fraction` (0.1) and `test_fraction` (0.1) of them, with
`seed` (0). The same face may appear in several images, so splits may share people; rows
have no group (subject).
"""

from __future__ import annotations

import csv
import glob
import os
import re
import urllib.parse
from pathlib import Path

from data_pipelines.sources import base

DATASET = "emotionet"
MANUAL_NAMES = ("EmotioNet_FACS_aws_2020_24600.csv", "*24600*.csv")
LIST_NAMES = ("emotioNet_challenge_files_server_challenge*/dataFile_*.txt", "dataFile_*.txt")
NUM_LIST_AUS = 60
UNKNOWN = 999
_QUOTES = "'\" \t"
_AU_HEADER = re.compile(r"^AU0*(\d+)$", re.IGNORECASE)
# The `Skips.note` reason of the rows read from the automatically annotated lists because
# labels="auto" found no manual CSV.
AUTOMATIC = "automatically annotated AU labels (labels=auto found no manual CSV)"


def _label_files(root: Path, labels: str) -> tuple[list[Path], bool]:
    """The label files to read, for the `labels` option, and whether "auto" fell back to the
    automatically annotated lists."""
    if labels in ("auto", "manual"):
        try:
            return [base.find_file(root, MANUAL_NAMES, DATASET, "manual AU label CSV")], False
        except base.DatasetError:
            if labels == "manual":
                raise
    if labels in ("auto", "lists"):
        # After "auto" found no CSV, the message names every file looked for.
        names = LIST_NAMES if labels == "lists" else MANUAL_NAMES + LIST_NAMES
        first = base.find_file(root, names, DATASET, "AU label file")
        return sorted(first.parent.glob("dataFile_*.txt")), labels == "auto"
    files = sorted(p for p in map(Path, glob.glob(str(root / labels), recursive=True))
                   if p.is_file())
    if not files:
        raise base.DatasetError(f"{DATASET}: no label file matches {root / labels}")
    return files, False


def _image_index(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """File name -> path of every file under `folder`, and the names found more than once."""
    index: dict[str, Path] = {}
    repeated: dict[str, list[Path]] = {}
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if d != "__MACOSX")
        for name in sorted(names):
            path = Path(directory) / name
            if name in index:
                repeated.setdefault(name, [index[name]]).append(path)
            else:
                index[name] = path
    return index, repeated


def _image_name(url: str) -> str:
    """The file name at the end of a (possibly quoted) URL."""
    path = urllib.parse.urlsplit(url.strip(_QUOTES)).path
    return urllib.parse.unquote(path.rsplit("/", 1)[-1])


def _au_value(text: str) -> int:
    text = text.strip(_QUOTES)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"AU value {text!r} is not 0, 1 or {UNKNOWN}") from None
    if value == UNKNOWN:
        return -1
    if value not in (0, 1):
        raise ValueError(f"AU value {text!r} is not 0, 1 or {UNKNOWN}")
    return int(value)


def _rows(path: Path):
    """(line number, url, {AU: 0/1/-1}, None) for each label line of a file in either format;
    (line number, url or None, None, why) for a line that cannot be read."""
    lines = base.read_lines(path)
    first = next((line for line in lines if line.strip()), "")
    if "\t" in first:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != 2 + NUM_LIST_AUS:
                yield number, None, None, f"{len(cells)} fields, expected {2 + NUM_LIST_AUS}"
                continue
            try:
                labels = {au: _au_value(text) for au, text in enumerate(cells[2:], 1)}
            except ValueError as e:
                yield number, cells[0], None, str(e)
                continue
            yield number, cells[0], labels, None
        return
    reader = csv.reader(lines)
    header = [cell.replace("'", "").replace('"', "").replace(" ", "").strip()
              for cell in next(reader, [])]
    columns: dict[int, int] = {}
    for k, cell in enumerate(header):
        match = _AU_HEADER.match(cell)
        if match:
            if int(match.group(1)) in columns.values():
                raise base.DatasetError(f"{path}: two header columns name AU{match.group(1)}")
            columns[k] = int(match.group(1))
    url_column = next((k for k, cell in enumerate(header) if cell.lower() == "url"), None)
    if url_column is None or not columns:
        raise base.DatasetError(f"{path}: expected a tab-separated EmotioNet list or a CSV whose "
                                f"header has a URL column and AU columns (AU 1, ...); the "
                                f"first line is {first[:200]!r}")
    for number, cells in enumerate(reader, 2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, None, None, f"{len(cells)} fields, expected {len(header)}"
            continue
        try:
            labels = {au: _au_value(cells[k]) for k, au in columns.items()}
        except ValueError as e:
            yield number, cells[url_column], None, str(e)
            continue
        yield number, cells[url_column], labels, None


def read(root: Path, split: str, table: base.Table, *, labels: str = "auto",
         images_dir: str = "", validation_fraction: float = 0.1, test_fraction: float = 0.1,
         seed: int = 0) -> None:
    """Appends the EmotioNet images of `split` to `table` (see the module docstring).

    Raises:
      DatasetError: no label file, a label file in neither format, or no image folder.
    """
    files, automatic = _label_files(root, labels)
    if automatic:
        # The default asked for the manual labels; say loudly that these are not them.
        base.log.warning(
            "%s[%s]: found no manual label CSV (%s) under %s, so reading the automatically "
            "annotated lists in %s (%d files) instead: their AU labels come from EmotioNet's "
            "detector, not from FACS coders. Give labels='lists' to read them on purpose, or "
            "labels='manual' to require the CSV.", DATASET, split, MANUAL_NAMES[0], root,
            files[0].parent if files else root, len(files))
    folder = root / images_dir if images_dir else root
    if not folder.is_dir():
        raise base.DatasetError(f"{DATASET}: image folder {folder} is not a folder")
    index, repeated = _image_index(folder)
    for path in files:
        for number, url, aus, why in _rows(path):
            where = f"{path}:{number}"
            name = None if url is None else _image_name(url)
            if name:
                row_split = base.subject_split(name, seed, validation_fraction, test_fraction)
                if split not in ("all", row_split):
                    continue
            if why is not None:
                table.skips.skip("unreadable label line", where, why)
                continue
            if not name:
                table.skips.skip("no image URL", where, url)
                continue
            au = base.au_vector(aus)
            if (au < 0).all():
                table.skips.skip("no AU label", where, f"{name}: no AU of the model is coded")
                continue
            if name in repeated:
                table.skips.skip("ambiguous image file name", where,
                                 ", ".join(str(p) for p in repeated[name]))
                continue
            image = index.get(name, folder / name)
            if (table.add(image.relative_to(folder).as_posix(), where=where, path=image, au=au)
                    and automatic):
                table.skips.note(AUTOMATIC)
