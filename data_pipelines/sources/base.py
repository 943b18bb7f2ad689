"""What every dataset source shares: the label table, skip accounting, image reading, splits.

A format module (one per published layout, `data_pipelines/sources/<name>.py`) does one thing:
it reads the dataset's label files and fills a `Table` (one row per face: the image file or
pixels, the labels in the project's label spaces, an optional face box or landmarks). Everything
after that is here:

* `Table` stores the rows as columns (numpy arrays), so an index of millions of frames costs
  tens of bytes a row, and `FileSource` serves them as DESIGN records (docs/design.md#records)
  through grain's random-access interface, reading and decoding each image when it is asked for.
* `Skips` counts every record that cannot be used, by reason, logs where it was (file and line),
  and with `strict=True` raises at the first one instead. Nothing is given a guessed label: a
  label that cannot be read exactly drops the record (or that label alone, when a format says
  so), and the drop is counted. Records kept with a caveat (labels of a weaker kind than asked
  for) are counted too, so that every report says so.
* `read_image` decodes whatever the datasets contain (greyscale, CMYK, RGBA, palette, 16-bit)
  into uint8 RGB, and refuses a truncated or corrupt file instead of returning half an image.
* `subject_split` assigns whole subjects (or videos) to train / validation / test by a seeded
  hash of their name, so no person is in two splits and adding a subject moves no other one.

Labels are kept over the 17 AUs of `taxonomy.AUS` (-1 where the dataset does not annotate an
AU); `FileSource` projects them onto the AU list it is given.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import schema
from fbnet_jax.core import taxonomy
from fbnet_jax.core.errors import UserError

log = logging.getLogger("fbnet.data")

SPLITS = ("train", "validation", "test", "all")
NUM_AUS = len(taxonomy.AUS)
_AU_COLUMN = {au: k for k, au in enumerate(taxonomy.AUS)}
# How many occurrences of each skip reason are logged with their place (all are counted).
LOGGED_PER_REASON = 5


class DatasetError(UserError, ValueError):
    """A dataset file or layout cannot be read at all; the message names the file and what was
    expected. `fbnet` prints it as one line (exit status 2)."""


class BadRecordError(DatasetError):
    """With `strict=True`: the first record that could not be read correctly."""


class Skips:
    """Counts the records a source could not use, by reason, and where the first ones were.

    `skip(reason, where)` records one (`where` is `file:line` or a file); with `strict=True` it
    raises `BadRecordError` instead. Reasons are short fixed phrases ("unknown expression code"),
    so the summary groups them.
    """

    def __init__(self, name: str, *, strict: bool = False):
        self.name = name
        self.strict = strict
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, list[str]] = collections.defaultdict(list)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.noted: collections.Counter[str] = collections.Counter()

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        """Counts a row left out by the dataset's label policy (a class outside the 7, a tie of
        votes, ...): correct data that the project does not use, so never an error, not even
        with `strict`. The first few are logged at INFO."""
        self.dropped[reason] += 1
        if self.dropped[reason] <= LOGGED_PER_REASON:
            log.info("%s: left out %s: %s%s", self.name, where, reason,
                     f" ({detail})" if detail else "")

    def note(self, reason: str, count: int = 1) -> None:
        """Counts `count` records that are kept, but whose labels the user must know to be of
        another kind than asked for (EmotioNet's automatically annotated lists read because no
        manual file was found). Not a skip; the summary and `fbnet prepare` report it. The
        source logs the warning itself, once."""
        self.noted[reason] += count

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        text = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadRecordError(f"{self.name}: {text} [strict: stopping at the first bad record]")
        self.counts[reason] += 1
        if len(self.first[reason]) < LOGGED_PER_REASON:
            self.first[reason].append(text)
            log.warning("%s: skipped %s", self.name, text)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, named: bool = True) -> str:
        """One line: how many were skipped, for what, and where the first of each was; then
        the rows left out by label policy and the rows kept with a caveat (`note`), if any.
        `named`: starting with the source's name."""
        if not self.total:
            line = "no record skipped"
        else:
            parts = [f"{n} {reason} (first: {self.first[reason][0].split(': ')[0]})"
                     for reason, n in self.counts.most_common()]
            line = f"skipped {self.total} record(s): " + "; ".join(parts)
        if named:
            line = f"{self.name}: {line}"
        if self.dropped:
            line += "; left out by label policy: " + ", ".join(
                f"{n} {reason}" for reason, n in self.dropped.most_common())
        if self.noted:
            line += "; noted: " + ", ".join(
                f"{n} {reason}" for reason, n in self.noted.most_common())
        return line


def au_vector(labels: Mapping[int, int]) -> np.ndarray:
    """int8 [17] over taxonomy.AUS: -1 for AUs not in `labels`, else the 0/1 label.

    AUs outside the 17 (a dataset may code AU11 or AU27) are ignored: the model has no output
    for them.
    """
    out = np.full(NUM_AUS, schema.MISSING_AU, np.int8)
    for au, value in labels.items():
        column = _AU_COLUMN.get(int(au))
        if column is not None:
            out[column] = value
    return out


def project_aus(au: np.ndarray, aus: Sequence[int]) -> np.ndarray:
    """Columns of `au` (..., 17 over taxonomy.AUS) for the configured `aus`; -1 outside the 17."""
    missing = np.full(au.shape[:-1], schema.MISSING_AU, np.int8)
    columns = [au[..., _AU_COLUMN[a]] if a in _AU_COLUMN else missing for a in aus]
    return np.stack(columns, axis=-1).astype(np.int8)


class Table:
    """A dataset's rows, appended one at a time and stored as columns.

    Each row is one face: `key` (unique; the image path relative to the dataset root, or
    `<video>/<frame>`), where its pixels come from (`path`, an absolute image file, or `pixels`,
    a uint8 array held in memory), its labels, and optionally the face `box` (x0, y0, x1, y1 in
    the image's pixels) or `landmarks` ([K, 2] x, y) used to crop it. Duplicated keys are
    skipped and counted (the first row of a key is kept).
    """

    def __init__(self, skips: Skips, *, check_files: bool = True):
        self.skips = skips
        self.check_files = check_files
        self._keys: list[str] = []
        self._seen: set[str] = set()
        self._paths: list[str | None] = []
        self._pixels: list[np.ndarray | None] = []
        self._expression: list[int] = []
        self._au: list[np.ndarray] = []
        self._va: list[tuple[float, float]] = []
        self._compound: list[int] = []
        self._box: list[tuple[float, float, float, float]] = []
        self._landmarks: dict[int, np.ndarray] = {}
        self._groups: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, *, where: str, path: str | os.PathLike | None = None,
            pixels: np.ndarray | None = None, expression: int = schema.MISSING_EXPRESSION,
            au: np.ndarray | None = None, va: tuple[float, float] | None = None,
            compound: int = schema.MISSING_COMPOUND,
            box: tuple[float, float, float, float] | None = None,
            landmarks: np.ndarray | None = None, group: str = "") -> bool:
        """Appends one row; returns False (and counts it) when it cannot be used.

        Skipped: a key seen before (the first row of a key is kept), and, with `check_files`,
        an image file that does not exist. `where` (file:line) is only used in messages.
        `group` is the subject or video the row belongs to, for splits and reports.
        """
        if (path is None) == (pixels is None):
            raise ValueError(f"{where}: a row needs exactly one of path and pixels")
        if key in self._seen:
            self.skips.skip("duplicated key", where, key)
            return False
        if path is not None and self.check_files and not os.path.isfile(path):
            self.skips.skip("image file not found", where, os.fspath(path))
            return False
        self._seen.add(key)
        self._keys.append(key)
        self._paths.append(None if path is None else os.fspath(path))
        self._pixels.append(pixels)
        self._expression.append(int(expression))
        self._au.append(np.full(NUM_AUS, schema.MISSING_AU, np.int8) if au is None
                        else np.asarray(au, np.int8))
        self._va.append((math.nan, math.nan) if va is None else (float(va[0]), float(va[1])))
        self._compound.append(int(compound))
        self._box.append((math.nan,) * 4 if box is None else tuple(float(v) for v in box))
        if landmarks is not None:
            self._landmarks[len(self._keys) - 1] = np.asarray(landmarks, np.float32)
        self._groups.append(group)
        return True

    def columns(self) -> dict[str, Any]:
        """The rows as numpy columns (what `FileSource` serves)."""
        n = len(self._keys)
        return {
            "key": np.array(self._keys, dtype=object),
            "path": np.array(self._paths, dtype=object),
            "pixels": self._pixels if any(p is not None for p in self._pixels) else None,
            "expression": np.array(self._expression, np.int32).reshape(n),
            "au": np.stack(self._au).astype(np.int8) if n else np.zeros((0, NUM_AUS), np.int8),
            "va": np.array(self._va, np.float32).reshape(n, 2),
            "compound": np.array(self._compound, np.int32).reshape(n),
            "box": np.array(self._box, np.float32).reshape(n, 4),
            "landmarks": dict(self._landmarks),
            "group": np.array(self._groups, dtype=object),
        }


def read_image(data: bytes, where: str) -> np.ndarray:
    """Decodes an encoded image into uint8 RGB [H, W, 3].

    Greyscale becomes three equal channels, CMYK and palette images are converted, an alpha
    channel is dropped, 16-bit and 32-bit images are scaled to 8 bits. A truncated or corrupt
    file raises `DatasetError` naming `where` (PIL would otherwise return the part it could
    read, padded with grey).

    Raises:
      DatasetError: the bytes are not a complete image.
    """
    if not data:
        raise DatasetError(f"{where}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(image, np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(array[..., None], 3, axis=-1)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            rgb = image.convert("RGB")
            return np.asarray(rgb, np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e


def crop_face(image: np.ndarray, box: np.ndarray, margin: float,
              landmarks: np.ndarray | None = None) -> np.ndarray:
    """The face in `box` (x0, y0, x1, y1), widened by `margin` of its size on every side, square.

    With 68-point `landmarks` (iBUG order), the face is first rotated about the box centre so
    that the eye centres are level (points 36-41 and 42-47). Parts of the crop outside the image
    are filled by replicating the border, so a box at the edge keeps the face centred.
    """
    import cv2  # pylint: disable=g-import-not-at-top

    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    if not side > 1:
        raise DatasetError(f"face box {box.tolist()} is empty")
    angle = 0.0
    if landmarks is not None and len(landmarks) == 68:
        left, right = landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)
        angle = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
    size = max(int(round(side)), 1)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    matrix[:, 2] += (size / 2 - cx, size / 2 - cy)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """The tight box (x0, y0, x1, y1) around a set of landmarks."""
    return np.concatenate([landmarks.min(axis=0), landmarks.max(axis=0)]).astype(np.float32)


def subject_split(group: str, seed: int, validation: float, test: float) -> str:
    """"train", "validation" or "test" for a subject/video, from a seeded hash of its name.

    A group's split depends only on its own name and the seed, so adding subjects moves no other
    one, and every row of a group lands in the same split (no person is in two splits).
    """
    # blake2b, not crc32: a CRC is linear, so another seed would only XOR one constant into
    # every name's hash and the "independent" splits of two seeds would be strongly related.
    digest = hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def check_split(split: str, allowed: Iterable[str], dataset: str) -> None:
    allowed = tuple(allowed)
    if split not in allowed:
        raise DatasetError(f"{dataset}: no split {split!r}; it has {', '.join(allowed)}")


def find_file(root: Path, names: Sequence[str], dataset: str, what: str) -> Path:
    """The first of `names` (paths relative to `root`, globs allowed) that exists, searching
    one and two folder levels down too (copies often nest the release in extra folders).

    Raises:
      DatasetError: none exists; the message lists the paths looked for.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset}: root {root} is not a folder")
    for prefix in ("", "*/", "*/*/"):
        for name in names:
            hits = sorted(p for p in root.glob(prefix + name) if "__MACOSX" not in p.parts)
            if hits:
                return hits[0]
    looked = ", ".join(str(root / n) for n in names)
    raise DatasetError(f"{dataset}: found no {what} under {root}; looked for {looked} "
                       f"(also one and two folders down)")


def read_lines(path: Path) -> list[str]:
    """A text file's lines without line endings (LF or CRLF; a last line without a newline is a
    line), decoded as UTF-8 with a byte-order mark allowed.

    Raises:
      DatasetError: the file cannot be read or decoded.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e
    return text.splitlines()


def csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict | str]]:
    """(line number, {column: stripped cell}) for each non-empty row of a CSV file, or (line
    number, what is wrong) for a row with another number of fields than the header.

    Raises:
      DatasetError: the file is empty or its header lacks one of `required`.
    """
    reader = csv.reader(read_lines(path))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DatasetError(f"{path}: empty file (expected a header with "
                           f"{', '.join(required)})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path}: the header lacks {', '.join(missing)} (got "
                           f"{', '.join(header)}; expected {', '.join(required)})")
    for number, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, f"{len(cells)} fields, expected {len(header)}"
            continue
        yield number, {h: c.strip() for h, c in zip(header, cells)}


class FileSource:
    """A grain random-access source over a `Table`: record i is row i, read when asked for.

    Records follow docs/design.md#records: `image` uint8 RGB (the face crop where the row has a
    box or landmarks, widened by `margin`), labels projected onto `aus`, `source` =
    `source_index`, and `key`.

    An image that cannot be decoded is found only when it is read. What happens then is
    `unreadable`: "next" (training) serves the next readable row instead, so the stream keeps
    its length and order and no label is attached to another face; "mask" (evaluation) serves a
    row with every label missing and key "" that evaluation counts as padding; "raise" stops.
    Every unreadable image is logged (file and reason) and counted in `unreadable_count` of the
    process that read it.
    """

    MAX_CONSECUTIVE_UNREADABLE = 50

    def __init__(self, name: str, root: str | os.PathLike, split: str, table: Table, *,
                 aus: Sequence[int] = taxonomy.AUS, source_index: int = 0,
                 margin: float = 0.2, unreadable: str = "next"):
        if unreadable not in ("next", "mask", "raise"):
            raise ValueError(f"unreadable must be 'next', 'mask' or 'raise', got {unreadable!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        columns = table.columns()
        self.name, self.root, self.split = name, os.fspath(root), split
        self.skips = table.skips
        self.aus = tuple(int(a) for a in aus)
        self.source_index = int(source_index)
        self.margin = float(margin)
        self.unreadable = "raise" if table.skips.strict else unreadable
        self.unreadable_count = 0
        self._keys = columns["key"]
        self._paths = columns["path"]
        self._pixels = columns["pixels"]
        self._expression = columns["expression"]
        self._au = project_aus(columns["au"], self.aus)
        self._va = columns["va"]
        self._compound = columns["compound"]
        self._box = columns["box"]
        self._landmarks = columns["landmarks"]
        self.groups = columns["group"]

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return (f"FileSource({self.name!r}, split={self.split!r}, root={self.root!r}, "
                f"{len(self)} records)")

    @property
    def expression_labels(self) -> np.ndarray:
        """int32 [N]: every row's expression (-1 missing), for class counts and balancing."""
        return self._expression

    def labels(self, index: int) -> schema.Record:
        """Record `index` without its image (nothing is read from disk): for label statistics
        such as `fbnet relatedness`."""
        row = int(index) % len(self)
        va = self._va[row]
        return {schema.KEY: self._keys[row], schema.EXPRESSION: np.int32(self._expression[row]),
                schema.AU: self._au[row], schema.VA: va,
                schema.COMPOUND: np.int32(self._compound[row]),
                schema.SOURCE: np.int32(self.source_index)}

    def info(self) -> "SourceInfo":
        return SourceInfo(self.name, self.split, self.root, len(self), self.skips)

    def __getitem__(self, index: int) -> schema.Record:
        n = len(self)
        index = int(index) % n
        for attempt in range(min(n, self.MAX_CONSECUTIVE_UNREADABLE)):
            row = (index + attempt) % n
            try:
                return self._record(row)
            except DatasetError as e:
                self.unreadable_count += 1
                log.warning("%s: unreadable image skipped: %s", self.name, e)
                if self.unreadable == "raise":
                    raise
                if self.unreadable == "mask":
                    return schema.make_record(np.zeros((1, 1, 3), np.uint8), key="",
                                              source=self.source_index, num_aus=len(self.aus))
        raise DatasetError(f"{self.name}: {min(n, self.MAX_CONSECUTIVE_UNREADABLE)} images in a "
                           f"row from {self._where(index)} could not be read; is the dataset "
                           f"complete?")

    def _where(self, row: int) -> str:
        path = self._paths[row]
        return path if path is not None else f"{self.root} [{self._keys[row]}]"

    def _record(self, row: int) -> schema.Record:
        if self._pixels is not None and self._pixels[row] is not None:
            image = np.asarray(self._pixels[row], np.uint8)
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
        else:
            path = self._paths[row]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
            image = read_image(data, path)
        landmarks = self._landmarks.get(row)
        box = self._box[row]
        if not np.isfinite(box).all() and landmarks is not None:
            box = landmark_box(landmarks)
        if np.isfinite(box).all():
            try:
                image = crop_face(image, box, self.margin, landmarks)
            except DatasetError as e:
                raise DatasetError(f"{self._where(row)}: {e}") from e
        va = self._va[row]
        return schema.make_record(
            image, key=self._keys[row], source=self.source_index,
            expression=int(self._expression[row]), au=self._au[row],
            va=None if np.isnan(va).any() else va, compound=int(self._compound[row]),
            num_aus=len(self.aus))


@dataclasses.dataclass
class SourceInfo:
    """What a source reports about itself: for logs and `fbnet prepare`."""
    name: str
    split: str
    root: str
    num_records: int
    skips: Skips

    def line(self) -> str:
        return (f"{self.name} [{self.split}] {self.num_records} record(s) from {self.root}; "
                f"{self.skips.summary(named=False)}")
