"""`fer2013` and `ferplus`: FER2013 (Kaggle ICML 2013 challenge) and its FER+ relabelling.

Both read the 48x48 greyscale faces from the FER2013 CSV, where they are held as text, and keep
them in memory as uint8 [48, 48] arrays (about 80 MB for the 35,887 images). `root` is a folder
holding the files (searched one and two folders down too):

  fer2013.csv          header `emotion,pixels,Usage`; or icml_face_data.csv, the same data with
                       the header `emotion, Usage, pixels` (other order, leading spaces)
  fer2013new.csv       FER+ only (microsoft/FERPlus): `Usage,Image name,neutral,happiness,
                       surprise,sadness,anger,disgust,fear,contempt,unknown,NF`

Kaggle's train.csv / test.csv split of FER2013 is not read (its test part has no labels).

`pixels` is 2304 integers 0..255 separated by spaces, row-major. `emotion` 0..6 is 0 Angry,
1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral, mapped onto the project's order.

FER+ has the same rows as fer2013.csv in the same order: row i of fer2013new.csv labels the image
of row i of fer2013.csv (FERPlus's generate_training_data.py pairs them so). Its columns are the
votes of 10 taggers over neutral, happiness, surprise, sadness, anger, disgust, fear, contempt,
unknown and NF (not a face). Option `vote` picks how the votes become one label:

  "majority" (default)  FER+'s own rule (the "majority" mode of FERPlus's src/ferplus.py): a
                        count of 1 (a single tagger) is an outlier and set to 0; the label is
                        the column holding more than half of the remaining votes, all 10 columns
                        counted (unknown and NF included). A row where no column does is left
                        out ("no majority vote"), as FER+'s reader leaves it out of training.
  "plurality"           the column with strictly the most votes, every vote counted; a tie for
                        the most is left out ("tied votes").

Either way the row is left out (counted under its own reason) when the winner is contempt
(there is no 8th class), unknown or NF, when no tagger voted, and when the image name is empty
(FER+ leaves it empty for non-faces). These are FER+'s labels, not bad data (`Skips.drop`); a
vote count that is not a number skips the row as bad data.
The files must have the same number of rows and the same Usage on each row, else they are not
the pair FER+ was made from and `DatasetError` is raised.

Splits: the dataset's own, from the Usage column: Training -> "train", PublicTest ->
"validation", PrivateTest -> "test" ("all": every row). Keys: `fer2013` rows are
`<csv file>/<row>` (row = 0-based data row), `ferplus` rows are the FER+ image name
(`fer0000000.png`). `fer2013` has no options; `ferplus` has `vote` (above).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.sources import base

_FER_FILES = ("fer2013.csv", "icml_face_data.csv")
_FER_COLUMNS = ("emotion", "pixels", "Usage")
_USAGE = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
# FER2013 emotion 0..6 -> index into taxonomy.EXPRESSIONS
# (docs/datasets.md#mapping-to-the-7-expressions).
_FER_TO_C7 = (1, 2, 3, 4, 5, 6, 0)
# FER+ vote columns -> index into taxonomy.EXPRESSIONS; None: the row is dropped when it wins.
_VOTES = (("neutral", 0), ("happiness", 4), ("surprise", 6), ("sadness", 5), ("anger", 1),
          ("disgust", 2), ("fear", 3), ("contempt", None), ("unknown", None), ("NF", None))
_DROPPED_WINNER = {"contempt": "contempt", "unknown": "unknown", "NF": "not a face"}
VOTES = ("majority", "plurality")
_SIDE = 48


def _in_split(row: dict, split: str, table: base.Table, where: str) -> bool:
    """Whether a row's Usage puts it in `split`; an unknown Usage is skipped and counted."""
    row_split = _USAGE.get(row["Usage"])
    if row_split is None:
        table.skips.skip("unknown usage", where, row["Usage"])
        return False
    return split in ("all", row_split)


def _pixels(text: str) -> np.ndarray:
    """uint8 [48, 48] from 2304 space-separated integers 0..255.

    Raises:
      ValueError: a value is not such an integer, or there are not 2304 of them.
    """
    values = text.split()
    if len(values) != _SIDE * _SIDE:
        raise ValueError(f"{len(values)} pixel values, expected {_SIDE * _SIDE}")
    array = np.array(values, np.int64)
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"pixel values outside 0..255 ({array.min()}..{array.max()})")
    return array.astype(np.uint8).reshape(_SIDE, _SIDE)


def _fer_file(root: Path, dataset: str) -> Path:
    return base.find_file(root, _FER_FILES, dataset, "FER2013 CSV file")


def read_fer2013(root: Path, split: str, table: base.Table) -> None:
    """Appends FER2013's images of `split` to `table` (see the module docstring)."""
    root = Path(root)
    path = _fer_file(root, "fer2013")
    name = path.relative_to(root).as_posix()
    for index, (number, row) in enumerate(base.csv_rows(path, _FER_COLUMNS)):
        where = f"{path}:{number}"
        if isinstance(row, str):
            table.skips.skip("wrong number of fields", where, row)
            continue
        if not _in_split(row, split, table, where):
            continue
        code = row["emotion"]
        if not (code.isascii() and code.isdigit() and int(code) < len(_FER_TO_C7)):
            table.skips.skip("unknown expression code", where, code)
            continue
        try:
            pixels = _pixels(row["pixels"])
        except ValueError as e:
            table.skips.skip("unreadable pixels", where, str(e))
            continue
        table.add(f"{name}/{index:05d}", where=where, pixels=pixels,
                  expression=_FER_TO_C7[int(code)])


def _vote(row: dict, vote: str) -> tuple[int | None, str, str]:
    """(expression, "", "") for the label `vote` gives, else (None, reason, detail) of the drop.

    See the module docstring for the two rules.
    """
    votes = []
    for column, _ in _VOTES:
        text = row[column]
        if not (text.isascii() and text.isdigit()):
            return None, "unreadable votes", f"{column} = {text!r}"
        votes.append(int(text))
    if not any(votes):
        return None, "no votes", ""
    columns = [column for column, _ in _VOTES]
    if vote == "majority":
        # FER+'s reader drops single votes as outliers before looking for a majority; the
        # unknown and NF votes stay in the total, so they can deny a class its majority.
        counted = [v if v > 1 else 0 for v in votes]
        total = sum(counted)
        winners = [c for c, v in zip(columns, counted) if 2 * v > total]
        if not winners:
            shown = ", ".join(f"{c} {v}" for c, v in zip(columns, counted) if v)
            return None, "no majority vote", (f"{shown} of {total} votes counted" if total
                                              else "no column has more than one vote")
    else:
        top = max(votes)
        winners = [c for c, v in zip(columns, votes) if v == top]
        if len(winners) > 1:
            return None, "tied votes", " = ".join(winners) + f" = {top}"
    expression = dict(_VOTES)[winners[0]]
    if expression is None:
        return None, f"{vote} vote {_DROPPED_WINNER[winners[0]]}", ""
    return expression, "", ""


def read_ferplus(root: Path, split: str, table: base.Table, *, vote: str = "majority") -> None:
    """Appends FER+'s images of `split` to `table` (see the module docstring).

    Args:
      root: the folder holding fer2013new.csv and the FER2013 CSV (or one or two folders above).
      split: train / validation / test (FER2013's Usage) / all.
      table: where the rows go.
      vote: "majority" (FER+'s own rule) or "plurality": how the 10 taggers' votes become one
        label.

    Raises:
      DatasetError: a bad `vote`, a file missing or unreadable, or fer2013new.csv and the
        FER2013 CSV without the same rows (count or Usage).
    """
    if vote not in VOTES:
        raise base.DatasetError(f"ferplus: option vote must be 'majority' (FER+'s own rule) or "
                                f"'plurality', got {vote!r}")
    root = Path(root)
    ferplus = base.find_file(root, ("fer2013new.csv",), "ferplus", "FER+ label file")
    fer = _fer_file(root, "ferplus")
    columns = ("Usage", "Image name") + tuple(c for c, _ in _VOTES)
    fer_rows = base.csv_rows(fer, _FER_COLUMNS)
    for number, row in base.csv_rows(ferplus, columns):
        where = f"{ferplus}:{number}"
        fer_number, fer_row = next(fer_rows, (None, None))
        if fer_number is None:
            raise base.DatasetError(f"ferplus: {ferplus} has more rows than {fer} (line "
                                    f"{number} has no FER2013 row); they must be row-aligned")
        if isinstance(row, str):
            table.skips.skip("wrong number of fields", where, row)
            continue
        fer_where = f"{fer}:{fer_number}"
        if isinstance(fer_row, str):
            table.skips.skip("unreadable FER2013 row", fer_where, fer_row)
            continue
        if row["Usage"] != fer_row["Usage"]:
            raise base.DatasetError(
                f"ferplus: {where} says Usage {row['Usage']!r} but the FER2013 row it labels, "
                f"{fer_where}, says {fer_row['Usage']!r}: the files are not row-aligned")
        if not _in_split(row, split, table, where):
            continue
        name = row["Image name"]
        if not name:  # FER+ gives no image name to its not-a-face rows
            table.skips.drop("no image name", where)
            continue
        expression, reason, detail = _vote(row, vote)
        if expression is None:
            # Unreadable vote counts are bad data; no majority, ties and the winners outside
            # the 7 expressions are FER+'s own labels that the project does not use.
            report = table.skips.skip if reason == "unreadable votes" else table.skips.drop
            report(reason, where, detail)
            continue
        try:
            pixels = _pixels(fer_row["pixels"])
        except ValueError as e:
            table.skips.skip("unreadable pixels", fer_where, str(e))
            continue
        table.add(name, where=where, pixels=pixels, expression=expression)
    if next(fer_rows, None) is not None:
        raise base.DatasetError(f"ferplus: {fer} has more rows than {ferplus}; they must be "
                                f"row-aligned")
