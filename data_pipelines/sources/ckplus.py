"""`ckplus`: CK+ (Extended Cohn-Kanade), posed sequences labelled at their peak frame.

`root` is the folder holding the extracted zips; each folder below is found one and two folders
down too (wrappers such as `Emotion_labels/Emotion/` are common):

  cohn-kanade-images/S005/001/S005_001_00000001.png ... S005_001_00000011.png
  Emotion/S005/001/S005_001_00000011_emotion.txt      the peak frame's emotion (327 sequences)
  FACS/S005/001/S005_001_00000011_facs.txt            the peak frame's AUs (all 593 sequences)
  Landmarks/S005/001/S005_001_00000011_landmarks.txt  68 points (x y) of each frame

One record per peak frame that has an emotion or a FACS file (the Emotion and FACS folders are
each optional, but not both). Files hold numbers in scientific notation, often with leading
spaces (`   3.0000000e+00`).

Labels:
  expression  the emotion file's code 0 neutral, 1 anger, 2 contempt, 3 disgust, 4 fear,
              5 happy, 6 sadness, 7 surprise, mapped onto the project's order. Contempt has no
              class among the 7: a contempt sequence keeps its AUs with no expression (their
              number is logged; one without a FACS file is skipped and counted). A sequence
              without an emotion file has no expression ("no file means no emotion label").
  au          from the FACS file (`AU intensity` per line; intensity 0 means present with no
              intensity given). CK+ codes every AU shown at the peak frame, so the AUs listed
              are 1 and the other AUs of the 17 are 0 (absent), not unknown. A peak frame without
              a FACS file has every AU unknown (-1).
The face is cropped around the frame's 68 landmarks, with the eyes levelled; a frame without a
landmarks file is used whole.

Splits: CK+ has none, so subjects (S005, ...) are split by a seeded hash of their id: no person
is in two splits (options `validation_fraction`, `test_fraction`, `seed`). "all" is every
record. Keys are the image paths relative to `root`.

Options:
  neutral_first_frame  also add the first frame of each sequence with an emotion file as
                       Neutral, with every AU unknown (a common convention, not an official
                       label: CK+ sequences start from a neutral face). Default False.
  validation_fraction  the fraction of subjects in "validation" (0.1).
  test_fraction        the fraction of subjects in "test" (0.1).
  seed                 the seed of the split (0).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from data_pipelines.sources import base
from fbnet_jax.core import taxonomy

# CK+ emotion code 0..7 -> index into taxonomy.EXPRESSIONS; None: contempt
# (docs/datasets.md#mapping-to-the-7-expressions).
_CK_TO_C7 = (0, 1, None, 2, 3, 4, 5, 6)
_FRAME = re.compile(r"^(S\d+)_(\d+)_(\d+)$")
_NUM_LANDMARKS = 68


def _folder(root: Path, name: str, what: str) -> Path:
    """The folder `name` holding the subject folders (S005, ...), searched with base.find_file."""
    return base.find_file(root, (f"{name}/S[0-9]*",), "ckplus", what).parent


def _optional_folder(root: Path, name: str, what: str) -> Path | None:
    try:
        return _folder(root, name, what)
    except base.DatasetError:
        return None


def _label_files(folder: Path | None, suffix: str) -> dict[str, Path]:
    """{frame name (S005_001_00000011): file} of the `<frame><suffix>` files under `folder`."""
    if folder is None:
        return {}
    return {p.name[:-len(suffix)]: p for p in sorted(folder.rglob(f"*{suffix}"))
            if "__MACOSX" not in p.parts and not p.name.startswith("._")}


def _numbers(path: Path) -> list[tuple[int, list[float]]]:
    """(line number, the line's numbers) for each non-empty line of a file.

    Raises:
      ValueError: a value is not a finite number.
    """
    rows = []
    for number, line in enumerate(base.read_lines(path), 1):
        fields = line.split()
        if fields:
            values = [float(v) for v in fields]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"line {number}: {line.strip()!r} is not finite")
            rows.append((number, values))
    return rows


def _emotion(path: Path) -> int:
    """The emotion file's code 0..7.

    Raises:
      ValueError: the file does not hold exactly one of the codes.
    """
    rows = _numbers(path)
    values = [v for _, line in rows for v in line]
    if len(values) != 1 or values[0] != int(values[0]) or not 0 <= values[0] < len(_CK_TO_C7):
        raise ValueError(f"expected one code 0..7, got {values}")
    return int(values[0])


def _facs(path: Path) -> np.ndarray:
    """The 17-AU vector of a FACS file: 1 for the AUs listed, 0 for the others.

    Raises:
      ValueError: a line is not `AU intensity` with an AU number >= 1 and an intensity >= 0,
        or the file lists no AU.
    """
    present = set()
    for number, values in _numbers(path):
        if len(values) != 2:
            raise ValueError(f"line {number}: {len(values)} numbers, expected 2 (AU intensity)")
        au, intensity = values
        if au != int(au) or au < 1 or intensity < 0:
            raise ValueError(f"line {number}: AU {au}, intensity {intensity}")
        present.add(int(au))
    if not present:
        raise ValueError("no AU listed")
    return base.au_vector({au: int(au in present) for au in set(taxonomy.AUS) | present})


def _landmarks(path: Path) -> np.ndarray:
    """float32 [68, 2] (x, y) of a landmarks file.

    Raises:
      ValueError: not 68 lines of two finite numbers.
    """
    rows = _numbers(path)
    if len(rows) != _NUM_LANDMARKS or any(len(values) != 2 for _, values in rows):
        raise ValueError(f"expected {_NUM_LANDMARKS} lines of 'x y', got {len(rows)} line(s)")
    return np.array([values for _, values in rows], np.float32)


def read(root: Path, split: str, table: base.Table, *, neutral_first_frame: bool = False,
         validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends CK+'s peak frames (and optionally first frames) of `split` to `table`.

    Raises:
      DatasetError: no image folder, or neither an Emotion nor a FACS folder, under `root`.
    """
    root = Path(root)
    images = _folder(root, "cohn-kanade-images", "CK+ image folder")
    emotion_dir = _optional_folder(root, "Emotion", "CK+ Emotion folder")
    facs_dir = _optional_folder(root, "FACS", "CK+ FACS folder")
    if emotion_dir is None and facs_dir is None:
        raise base.DatasetError(
            f"ckplus: found no label folder under {root}; looked for {root / 'Emotion'}/S*/ and "
            f"{root / 'FACS'}/S*/ (also one and two folders down)")
    landmark_dir = _optional_folder(root, "Landmarks", "CK+ Landmarks folder")
    emotions = _label_files(emotion_dir, "_emotion.txt")
    facs = _label_files(facs_dir, "_facs.txt")
    contempt = unaligned = 0

    def landmarks_of(frame: str, where: str) -> tuple[bool, np.ndarray | None]:
        """(usable, landmarks): a frame without a landmarks file is used whole."""
        subject, sequence = frame.split("_")[:2]
        path = (None if landmark_dir is None
                else landmark_dir / subject / sequence / f"{frame}_landmarks.txt")
        if path is None or not path.is_file():
            return True, None
        try:
            return True, _landmarks(path)
        except ValueError as e:
            table.skips.skip("unreadable landmarks file", str(path), f"{where}: {e}")
            return False, None

    for frame in sorted(set(emotions) | set(facs)):
        where = str(emotions.get(frame) or facs[frame])
        match = _FRAME.match(frame)
        if match is None:
            table.skips.skip("unexpected file name", where, "expected S<subject>_<seq>_<frame>")
            continue
        subject, sequence = match.group(1), match.group(2)
        if split not in ("all", base.subject_split(subject, seed, validation_fraction,
                                                   test_fraction)):
            continue
        expression, labelled = -1, frame in emotions
        if labelled:
            try:
                code = _emotion(emotions[frame])
            except ValueError as e:
                table.skips.skip("unreadable emotion file", where, str(e))
                continue
            if _CK_TO_C7[code] is not None:
                expression = _CK_TO_C7[code]
        au = None
        if frame in facs:
            try:
                au = _facs(facs[frame])
            except ValueError as e:
                table.skips.skip("unreadable FACS file", str(facs[frame]), str(e))
                continue
        elif expression < 0:  # contempt and no FACS file: no label remains
            table.skips.drop("contempt without FACS file", where)
            continue
        usable, landmarks = landmarks_of(frame, where)
        if not usable:
            continue
        seq_dir = images / subject / sequence
        path = seq_dir / f"{frame}.png"
        added = table.add(path.relative_to(root).as_posix(), where=where, path=path,
                          expression=expression, au=au, landmarks=landmarks, group=subject)
        if added and labelled and expression < 0:
            contempt += 1
        if added and landmarks is None:
            unaligned += 1
        if neutral_first_frame and labelled:
            first = min(seq_dir.glob(f"{subject}_{sequence}_*.png"), default=None)
            if first is not None and first != path:
                usable, landmarks = landmarks_of(first.stem, where)
                if usable and table.add(first.relative_to(root).as_posix(), where=where,
                                        path=first, expression=taxonomy.NEUTRAL,
                                        landmarks=landmarks, group=subject):
                    if landmarks is None:
                        unaligned += 1
    if contempt:
        base.log.info("ckplus[%s]: %d contempt sequence(s) kept for their AUs, with no "
                      "expression (contempt is not one of the 7)", split, contempt)
    if unaligned:
        base.log.info("ckplus[%s]: %d frame(s) have no landmarks file and are used whole",
                      split, unaligned)
