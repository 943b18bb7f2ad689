"""`manifest`: any dataset, described by a CSV or JSONL file; no code to write.

`root` is the manifest file, or a folder holding `manifest.csv` or `manifest.jsonl`. Image paths
are relative to the manifest's folder (or absolute). Columns (CSV header / JSON keys), all but
`path` optional, an empty cell (or JSON null, or a missing key) meaning "not labelled":

  path                 the image file
  expression           0..6 in the project's order (Neutral, Anger, Disgust, Fear, Happiness,
                       Sadness, Surprise) or one of those names (any case)
  AU1, AU2, ... AU26   0 or 1, one column per annotated AU (AUs outside the model's 17 ignored)
  valence, arousal     floats in [-1, 1], both or neither
  subject              who is in the image: splits keep each subject in one split
  split                train / validation / test: the dataset's own split, used as it is
  x0, y0, x1, y1       a face box in the image's pixels: the face is cropped (with the margin)

Without a `split` column, subjects (or, without a `subject` column, images) are split by a
seeded hash: `validation_fraction` and `test_fraction` of them (option `seed`).
A row whose label cannot be read exactly is skipped and counted, with its file and line.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from data_pipelines.sources import base
from fbnet_jax.core import taxonomy

_NAMES = {name.lower(): k for k, name in enumerate(taxonomy.EXPRESSIONS)}
_AU_COLUMN = re.compile(r"^AU\s*0*(\d+)$", re.IGNORECASE)
_BOX = ("x0", "y0", "x1", "y1")


def _manifest_file(root: Path) -> Path:
    if root.is_file():
        return root
    if root.is_dir():
        for name in ("manifest.csv", "manifest.jsonl"):
            if (root / name).is_file():
                return root / name
    raise base.DatasetError(f"manifest: {root} is neither a manifest file nor a folder holding "
                            f"manifest.csv or manifest.jsonl")


def _rows(path: Path):
    """(line number, {column: text or None}) for each row of a CSV or JSONL manifest."""
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(base.read_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, e
                continue
            if not isinstance(row, dict):
                yield number, ValueError("not a JSON object")
                continue
            yield number, {k: (None if v is None else str(v)) for k, v in row.items()}
        return
    lines = base.read_lines(path)
    reader = csv.reader(lines)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise base.DatasetError(f"{path}: empty manifest (expected a header with a path "
                                f"column)") from None
    if "path" not in header:
        raise base.DatasetError(f"{path}: the header has no 'path' column (got "
                                f"{', '.join(header)})")
    for number, cells in enumerate(reader, 2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, ValueError(f"{len(cells)} cells for {len(header)} columns")
            continue
        yield number, {h: (c.strip() or None) for h, c in zip(header, cells)}


def _expression(text: str | None) -> int:
    if text is None:
        return -1
    if text.lower() in _NAMES:
        return _NAMES[text.lower()]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expression {text!r} is not 0..6 or an expression name") from None
    if value != int(value) or not 0 <= value <= 6:
        raise ValueError(f"expression {text!r} is not 0..6 or an expression name")
    return int(value)


def _va(row: dict) -> tuple[float, float] | None:
    valence, arousal = row.get("valence"), row.get("arousal")
    if valence is None and arousal is None:
        return None
    if valence is None or arousal is None:
        raise ValueError("valence and arousal must be given together")
    values = (float(valence), float(arousal))
    if not all(math.isfinite(v) and -1 <= v <= 1 for v in values):
        raise ValueError(f"valence/arousal {values} not in [-1, 1]")
    return values


def _aus(row: dict) -> dict[int, int]:
    labels = {}
    for column, text in row.items():
        match = _AU_COLUMN.match(column)
        if match and text is not None:
            if text not in ("0", "1", "0.0", "1.0"):
                raise ValueError(f"{column} is {text!r}, not 0 or 1")
            labels[int(match.group(1))] = int(float(text))
    return labels


def read(root: Path, split: str, table: base.Table, *, validation_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends the manifest's rows of `split` to `table`."""
    path = _manifest_file(root)
    folder = path.parent
    for number, row in _rows(path):
        where = f"{path}:{number}"
        if isinstance(row, Exception):
            table.skips.skip("unreadable manifest row", where, str(row))
            continue
        image = row.get("path")
        if not image:
            table.skips.skip("no image path", where)
            continue
        given = row.get("split")
        if given is not None:
            if given not in ("train", "validation", "test"):
                table.skips.skip("unknown split", where, given)
                continue
            row_split = given
        else:
            row_split = base.subject_split(row.get("subject") or image, seed,
                                           validation_fraction, test_fraction)
        if split not in ("all", row_split):
            continue
        try:
            expression = _expression(row.get("expression"))
            va = _va(row)
            au = _aus(row)
            box = None
            if any(row.get(c) is not None for c in _BOX):
                box = tuple(float(row.get(c)) for c in _BOX)
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise ValueError(f"face box {box} is empty")
        except (ValueError, TypeError) as e:
            table.skips.skip("unreadable label", where, str(e))
            continue
        if expression < 0 and va is None and not au:
            table.skips.skip("no label", where)
            continue
        table.add(image, where=where, path=folder / image, expression=expression,
                  au=base.au_vector(au) if au else None, va=va, box=box,
                  group=row.get("subject") or "")
