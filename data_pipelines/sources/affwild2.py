"""`affwild2`: Aff-Wild2 as released for the ABAW challenges (every edition's layout).

Per-task annotations (option `task` = "va", "expr" or "au"), one text file per video:

  <annotation root>/<task folder>/<split folder>/<video>.txt
  cropped_aligned/<video>/00001.jpg, 00002.jpg, ...        (the organisers' aligned faces)

  edition   annotation root            task folders                           split folders
  ABAW1     annotations/               VA_Set, EXPR_Set, AU_Set               Training_Set,
                                                                              Validation_Set
  ABAW2     annotations/               VA_Set, EXPR_Set, AU_Set               Train_Set,
                                                                              Validation_Set
  ABAW3     Third ABAW Annotations/    VA_Estimation_Challenge,               Train_Set,
                                       EXPR_Classification_Challenge,         Validation_Set
                                       AU_Detection_Challenge
  ABAW5     (any name)                 as ABAW3                               as ABAW3
  ABAW6     6th_ABAW_Annotations/      VA_Estimation_Challenge,               as ABAW3
                                       EXPR_Recognition_Challenge,
                                       AU_Detection_Challenge

  The task folder is found under `root` (or one or two folders down) by these names, or by any
  folder `VA_*`, `EXPR_*`, `AU_*` holding a `*Train*` or `*Valid*` folder; its split folders
  by the names above, else by `*Train*` and `*Valid*`. Line 1 of a file is a header and line
  i + 1 is frame i (1-based), whose image is `cropped_aligned/<video>/<i:05d>.jpg`; the key is
  `<video>/<i:05d>.jpg`. A video showing two people has two files, `<video>_left.txt` and
  `<video>_right.txt`, with image folders of the same names. A label line whose image does not
  exist (no face was detected in that frame) is skipped and counted.

  VA    header `valence,arousal`; lines `v,a`, floats in [-1, 1]; -5 means not annotated.
  EXPR  header of 7 (ABAW1, ABAW2) or 8 (ABAW3 on, adding `Other`) class names; lines hold one
        code: 0 Neutral, 1 Anger, 2 Disgust, 3 Fear, 4 Happiness, 5 Sadness, 6 Surprise (the
        project's order), 7 Other; -1 means not annotated. Under a header naming exactly the 7
        classes, 7 is an unknown code.
  AU    header `AU1,AU2,...`: the AUs of the columns (8 in ABAW1: 1, 2, 4, 6, 12, 15, 20, 25;
        12 from ABAW2 on: 1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26); values 0 or 1, -1 meaning
        that AU is not annotated.

Multi-task annotations (`task="mtl"`; s-Aff-Wild2 of ABAW4 and ABAW7), one file per split:

  training_set_annotations.txt, validation_set_annotations.txt   (under root, or one or two
                                                                   folders down)
  cropped_aligned/<video>/<frame>.jpg

  A header line (not checked), then one line per image:
  `<video>/<frame>.jpg,valence,arousal,expression,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,
  AU25,AU26` (16 fields). The image name is the key.

Images: every folder `cropped_aligned*` under `root` (or one or two folders down; ABAW5 and
ABAW6 add `cropped_aligned_new_50_vids`) is searched for a video's folder, in name order.

Splits: the test labels are not public, so the official validation set (`Validation_Set`,
`validation_set_annotations.txt`) is the `test` split. `validation` is a seeded fraction
(`validation_fraction`, `seed`) of the training videos, `train` the rest; `all` is both sets.
Rows are grouped by source video (the `_left`/`_right` suffix removed, so both people of a video
stay in one split): no video is in two splits.

Markers and skips: a frame whose label of the chosen task is not annotated (a -5 in its VA pair,
an expression of -1, every AU -1) is left out and counted apart (`Skips.drop`: correct data,
never a strict error); a single AU of -1 only makes that AU missing. In MTL lines each task's
marker makes only that label missing, and a line with no label left is left out. Expression 7
(Other, no class of the 7) leaves the frame out the same way, unless
`keep_other_as_missing_expression=True`: then an MTL line keeps its VA and AU labels with the
expression missing (in the EXPR task such a frame has no label left and is left out all the
same). A value outside [-1, 1] or NaN (VA), a code outside these, or a line with the wrong
number of fields skips the line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from data_pipelines.sources import base
from fbnet_jax.core import taxonomy

DATASET = "affwild2"
TASKS = ("va", "expr", "au", "mtl")
_TASK_FOLDERS = {
    "va": ("VA_Set", "VA_Estimation_Challenge"),
    "expr": ("EXPR_Set", "EXPR_Classification_Challenge", "EXPR_Recognition_Challenge"),
    "au": ("AU_Set", "AU_Detection_Challenge"),
}
_TRAIN_FOLDERS = ("Train_Set", "Training_Set")
_VALIDATION_FOLDERS = ("Validation_Set",)
_MTL_FILES = {"train": "training_set_annotations.txt", "test": "validation_set_annotations.txt"}
# The AU columns of the MTL files (ABAW2 on).
MTL_AUS = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)
VA_MISSING = -5.0
EXPR_MISSING = -1
AU_MISSING = -1
OTHER = 7
_SIDE = re.compile(r"_(left|right)$")
_AU_HEADER = re.compile(r"^AU\s*0*(\d+)$", re.IGNORECASE)
_SEVEN_CLASSES = [name.lower() for name in taxonomy.EXPRESSIONS]


# Frames the annotators left unlabelled (the challenge's -5 / -1 markers) or labelled outside the
# 7 expressions: correct data the project does not use, counted apart (never strict errors).
_POLICY = ("valence/arousal not annotated", "expression not annotated", "expression Other",
           "AUs not annotated", "no label")


def _report(table: base.Table, reason: str, detail: str, where: str) -> None:
    (table.skips.drop if reason in _POLICY else table.skips.skip)(reason, where, detail)


class _Skip(Exception):
    """A line that cannot be used: args are (reason, detail)."""


def source_video(video: str) -> str:
    """The video a per-person name comes from: `<video>_left` and `<video>_right` -> `<video>`."""
    return _SIDE.sub("", video)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Skip("unreadable value", text) from None


def _code(text: str) -> int | None:
    """An integer code, None for a number that is not an integer."""
    value = _number(text)
    return int(value) if math.isfinite(value) and value == int(value) else None


def _va(fields: list[str]) -> tuple[float, float] | None:
    """(valence, arousal), None where the pair carries the -5 marker."""
    values = (_number(fields[0]), _number(fields[1]))
    if VA_MISSING in values:
        return None
    if not all(math.isfinite(v) and -1 <= v <= 1 for v in values):
        raise _Skip("valence/arousal out of range", ",".join(fields))
    return values


def _expression(text: str, keep_other: bool, has_other: bool) -> int:
    """The expression index, -1 where not annotated (or Other, kept as missing)."""
    code = _code(text)
    if code == EXPR_MISSING:
        return -1
    if code == OTHER and has_other:
        if keep_other:
            return -1
        raise _Skip("expression Other", text)
    if code is None or not 0 <= code < len(taxonomy.EXPRESSIONS):
        raise _Skip("unknown expression code", text)
    return code


def _aus(fields: list[str], aus: tuple[int, ...]) -> dict[int, int]:
    """{AU: 0 or 1} over the annotated AUs of the line (a -1 leaves that AU out)."""
    labels = {}
    for au, text in zip(aus, fields):
        code = _code(text)
        if code not in (0, 1, AU_MISSING):
            raise _Skip("unknown AU value", f"AU{au}={text}")
        if code != AU_MISSING:
            labels[au] = code
    return labels


def _in_split(split: str, part: str, group: str, seed: int, validation_fraction: float) -> bool:
    """Whether a row of the official `part` ("train" or "test") belongs to `split`."""
    if split == "all":
        return True
    if part == "test":
        return split == "test"
    return base.subject_split(group, seed, validation_fraction, 0.0) == split


class _Images:
    """Finds the image folder of each video among the `cropped_aligned*` folders."""

    def __init__(self, root: Path, check_files: bool):
        self.roots: list[Path] = []
        for prefix in ("", "*/", "*/*/"):
            self.roots = [p for p in sorted(root.glob(prefix + "cropped_aligned*"))
                          if p.is_dir() and "__MACOSX" not in p.parts]
            if self.roots:
                break
        if not self.roots:
            if check_files:
                raise base.DatasetError(
                    f"{DATASET}: found no image folder under {root}; looked for "
                    f"{root / 'cropped_aligned'}* (also one and two folders down)")
            self.roots = [root / "cropped_aligned"]
        self._folders: dict[str, Path] = {}

    def folder(self, video: str) -> Path:
        if video not in self._folders:
            self._folders[video] = next(
                (r / video for r in self.roots if (r / video).is_dir()), self.roots[0] / video)
        return self._folders[video]


def _split_folder(task_folder: Path, names: tuple[str, ...], pattern: str) -> Path:
    for name in names:
        if (task_folder / name).is_dir():
            return task_folder / name
    hits = sorted(p for p in task_folder.glob(pattern) if p.is_dir())
    if hits:
        return hits[0]
    raise base.DatasetError(f"{DATASET}: {task_folder} has no {' or '.join(names)} folder")


def _task_folders(root: Path, task: str, split: str) -> dict[str, Path]:
    """{"train": Train_Set folder, "test": Validation_Set folder}, those that `split` needs."""
    token = task.upper()
    names = [f"{folder}/{part}" for folder in _TASK_FOLDERS[task]
             for part in _TRAIN_FOLDERS + _VALIDATION_FOLDERS]
    names += [f"{token}_*/*Train*", f"{token}_*/*Valid*"]
    task_folder = base.find_file(root, names, DATASET, f"{token} annotation folder").parent
    out = {}
    if split != "test":
        out["train"] = _split_folder(task_folder, _TRAIN_FOLDERS, "*Train*")
    if split in ("test", "all"):
        out["test"] = _split_folder(task_folder, _VALIDATION_FOLDERS, "*Valid*")
    return out


def _header(path: Path, lines: list[str]) -> list[str]:
    if not lines:
        raise base.DatasetError(f"{path}: empty file (expected a header line, then one line per "
                                f"frame)")
    header = [h.strip() for h in lines[0].split(",")]
    try:
        [float(h) for h in header]
    except ValueError:
        return header
    raise base.DatasetError(f"{path}: line 1 ({lines[0]!r}) is not a header; line 1 must be the "
                            f"header so that line i + 1 is frame i")


def _au_header(path: Path, header: list[str]) -> tuple[int, ...]:
    matches = [_AU_HEADER.match(h) for h in header]
    if not all(matches):
        raise base.DatasetError(f"{path}: the header {','.join(header)!r} is not a list of AUs "
                                f"(expected e.g. AU1,AU2,AU4,...)")
    return tuple(int(m.group(1)) for m in matches)


def _read_video(path: Path, task: str, table: base.Table, images: _Images, group: str,
                keep_other: bool) -> None:
    video = path.name[:-len(".txt")]
    lines = base.read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    header = _header(path, lines)
    aus = _au_header(path, header) if task == "au" else ()
    has_other = [h.lower() for h in header] != _SEVEN_CLASSES
    width = {"va": 2, "expr": 1, "au": len(aus)}[task]
    folder = images.folder(video)
    for frame in range(1, len(lines)):
        where = f"{path}:{frame + 1}"
        fields = [f.strip() for f in lines[frame].split(",")]
        expression, va, au = -1, None, None
        try:
            if not lines[frame].strip():
                raise _Skip("empty label line", "")
            if len(fields) != width:
                raise _Skip("wrong number of fields", f"{len(fields)}, expected {width}")
            if task == "va":
                va = _va(fields)
                if va is None:
                    raise _Skip("valence/arousal not annotated", lines[frame])
            elif task == "expr":
                expression = _expression(fields[0], keep_other, has_other)
                if expression < 0:
                    raise _Skip("expression Other" if _code(fields[0]) == OTHER
                                else "expression not annotated", fields[0])
            else:
                labels = _aus(fields, aus)
                au = base.au_vector(labels)
                if (au < 0).all():
                    raise _Skip("AUs not annotated", lines[frame])
        except _Skip as e:
            _report(table, *e.args, where)
            continue
        name = f"{frame:05d}.jpg"
        table.add(f"{video}/{name}", where=where, path=folder / name, expression=expression,
                  au=au, va=va, group=group)


def _read_tasks(root: Path, split: str, table: base.Table, task: str, *,
                validation_fraction: float, seed: int, keep_other: bool) -> None:
    folders = _task_folders(root, task, split)
    images = _Images(root, table.check_files)
    for part, folder in folders.items():
        for path in sorted(folder.glob("*.txt")):
            group = source_video(path.name[:-len(".txt")])
            if _in_split(split, part, group, seed, validation_fraction):
                _read_video(path, task, table, images, group, keep_other)


def _read_mtl(root: Path, split: str, table: base.Table, *, validation_fraction: float,
              seed: int, keep_other: bool) -> None:
    parts = [p for p in ("train", "test") if split == "all" or (p == "test") == (split == "test")]
    paths = {p: base.find_file(root, (_MTL_FILES[p],), DATASET, "MTL annotation file")
             for p in parts}
    images = _Images(root, table.check_files)
    width = 4 + len(MTL_AUS)
    for part, path in paths.items():
        for number, line in enumerate(base.read_lines(path)[1:], 2):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            fields = [f.strip() for f in line.split(",")]
            try:
                if len(fields) != width:
                    raise _Skip("wrong number of fields", f"{len(fields)}, expected {width}")
                name = fields[0]
                video, _, frame = name.partition("/")
                if not (video and frame):
                    raise _Skip("bad image name", f"{name!r}, expected <video>/<frame>.jpg")
                group = source_video(video)
                if not _in_split(split, part, group, seed, validation_fraction):
                    continue
                va = _va(fields[1:3])
                expression = _expression(fields[3], keep_other, True)
                au = base.au_vector(_aus(fields[4:], MTL_AUS))
                if va is None and expression < 0 and (au < 0).all():
                    raise _Skip("no label", line)
            except _Skip as e:
                _report(table, *e.args, where)
                continue
            table.add(name, where=where, path=images.folder(video) / frame,
                      expression=expression, au=au, va=va, group=group)


def read(root: Path, split: str, table: base.Table, *, task: str = "va",
         validation_fraction: float = 0.1, seed: int = 0,
         keep_other_as_missing_expression: bool = False) -> None:
    """Appends Aff-Wild2's frames of `split` for `task` to `table` (see the module docstring).

    Args:
      root: the dataset folder (holding the annotation root and `cropped_aligned`), or a folder
        one or two levels above the annotations.
      split: train / validation (carved from the training videos) / test (the official
        validation set) / all.
      table: where the rows go.
      task: "va", "expr", "au" (the per-task files) or "mtl" (the s-Aff-Wild2 files).
      validation_fraction: the fraction of training videos that form `validation`.
      seed: the seed of that split.
      keep_other_as_missing_expression: in MTL lines, keep an expression of Other (7) as a
        missing expression (the line keeps its VA and AU labels) instead of skipping the line.
    """
    if task not in TASKS:
        raise base.DatasetError(f"{DATASET}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    root = Path(root)
    options = dict(validation_fraction=validation_fraction, seed=seed,
                   keep_other=keep_other_as_missing_expression)
    if task == "mtl":
        _read_mtl(root, split, table, **options)
    else:
        _read_tasks(root, split, table, task, **options)
