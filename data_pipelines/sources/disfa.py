"""`disfa`: DISFA AU intensities, as AU occurrence, on frames extracted from its videos.

DISFA ships videos and one label file per subject and AU; the frames are extracted by the user
(one image per video frame, the left camera as the benchmarks use). Layout::

  root/
    ActionUnit_Labels/SN001/SN001_au1.txt ... SN001_au26.txt    12 files per subject
    frames/SN001/0.jpg 1.jpg ...                                 the extracted frames

(the label folder may also sit one or two folders down). Each label file has no header; a line
is `frame,intensity`, the frame number 1-based (4845 frames a video), the intensity an integer
0..5. The 12 AUs are 1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26, one file each; a subject missing
one of them is an error.

Frames: `frames_dir` (default "frames", relative to `root` or absolute) holds one folder per
subject named like its label folder (`SN001`). `frame_naming` is the file name of a frame as a
Python format string of `i` (the 0-based frame index = label frame - 1) and `n` (the 1-based
label frame number), e.g. "{i}.png" (ME-GraphAU's `SN001/0.png`), "{n:05d}.jpg" (LibreFace and
ffmpeg's `%05d`: `00001.jpg`). The default "auto" decides from both ends of the first subject
that has a frame folder, whose label files end at frame L (4845): for each width (none, 4, 5, 6
digits) and extension (.jpg, .png), frames numbered from 0 have a file `0` and none `L`;
frames numbered from 1 have files `1` and `L` and none `0`. Anything else (a missing first or
last frame, or one frame too many) is an error asking for `frame_naming`, since a wrong guess
would shift every label by a frame.

Labels: an AU is present iff its intensity >= `threshold` (default 2, the convention of
ME-GraphAU and JAA-Net). A frame is skipped (and counted) when one of its intensities is not
an integer in 0..5, when a file lists it twice, or when it is missing from one AU file (no
label is guessed); a line whose frame number cannot be read is skipped and counted as well.
Keys are `SN001/<label frame number>`; the group is the subject.

Split (option `fold`):
  None (default): subjects are assigned to train / validation / test by a seeded hash of their
    id (`base.subject_split`): `validation_fraction` (0.1), `test_fraction` (0.1), `seed` (0).
  1, 2 or 3: the standard 3-fold subject partition (ME-GraphAU): fold 1 tests on part 3, fold 2
    on part 2, fold 3 on part 1, and trains on the two other parts, of which a seeded
    `validation_fraction` of the subjects is held out as validation (`test_fraction` is not
    used). A subject outside the partition is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data_pipelines.sources import base

DATASET = "disfa"
AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
MAX_INTENSITY = 5
# The standard 3-fold subject partition (ME-GraphAU tool/DISFA_image_label_process.py).
PARTS = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)
FRAME_NAMINGS = tuple(f"{{{v}{width}}}.{ext}" for width in ("", ":04d", ":05d", ":06d")
                      for v in ("i", "n") for ext in ("jpg", "png"))


def fold_split(group: str, parts: Sequence[Sequence[str]], fold: int | None, seed: int,
               validation_fraction: float, test_fraction: float, dataset: str) -> str:
    """The split of a subject: seeded (`fold` None) or from a 3-fold partition.

    Fold k tests on part 4 - k (fold 1 on part 3, fold 3 on part 1) and trains on the others,
    of which a seeded `validation_fraction` of subjects is validation.

    Raises:
      DatasetError: `fold` is not None, 1, 2 or 3, or the subject is in no part.
    """
    if fold is None:
        return base.subject_split(group, seed, validation_fraction, test_fraction)
    if fold not in (1, 2, 3):
        raise base.DatasetError(f"{dataset}: fold must be 1, 2, 3 or None, got {fold!r}")
    part = next((k for k, members in enumerate(parts) if group in members), None)
    if part is None:
        raise base.DatasetError(f"{dataset}: subject {group} is in none of the 3 parts of the "
                                f"standard partition; use fold=None for a seeded split")
    if part == len(parts) - fold:
        return "test"
    return base.subject_split(group, seed, validation_fraction, 0.0)


def _naming(frames: Path, labels_dir: Path, subjects: list[str], frame_naming: str) -> str:
    """The frame file naming: `frame_naming`, checked, or detected from the first frame."""
    if not frames.is_dir():
        raise base.DatasetError(f"{DATASET}: no frame folder {frames}; DISFA ships videos: "
                                f"extract their frames to {frames}/SN001/0.jpg ... (see "
                                f"frames_dir and frame_naming)")
    if frame_naming != "auto":
        try:
            frame_naming.format(i=0, n=1)
        except (AttributeError, KeyError, IndexError, ValueError) as e:
            raise base.DatasetError(f"{DATASET}: frame_naming {frame_naming!r} is not a format "
                                    f"string of i (0-based) and n (1-based) ({e})") from None
        return frame_naming
    subject = next((s for s in subjects if (frames / s).is_dir()), None)
    if subject is None:
        raise base.DatasetError(f"{DATASET}: {frames} holds no subject folder; looked for "
                                f"{', '.join(str(frames / s) for s in subjects)}")
    folder = frames / subject
    last = _last_frame(labels_dir / subject / f"{subject}_au{AUS[0]}.txt")
    for width in ("", ":04d", ":05d", ":06d"):
        for ext in ("jpg", "png"):
            def exists(k, width=width, ext=ext):
                return (folder / f"{{k{width}}}.{ext}".format(k=k)).is_file()
            if exists(0) and not exists(last):
                return f"{{i{width}}}.{ext}"
            if exists(1) and exists(last) and not exists(0):
                return f"{{n{width}}}.{ext}"
            if exists(0) or exists(1) or exists(last):
                raise base.DatasetError(
                    f"{DATASET}: cannot tell whether the frames in {folder} are numbered from 0 "
                    f"or 1 (its labels end at frame {last}; files 0, 1, {last}"
                    f"{'' if width == '' else f' with width {width[1:]}'}.{ext} exist: "
                    f"{exists(0)}, {exists(1)}, {exists(last)}); set frame_naming, e.g. "
                    f"'{{i{width}}}.{ext}' (0-based) or '{{n{width}}}.{ext}' (1-based)")
    looked = ", ".join(n.format(i=0, n=1) for n in FRAME_NAMINGS)
    raise base.DatasetError(f"{DATASET}: found no first frame in {folder}; looked for {looked} "
                            f"(set frame_naming)")


def _last_frame(path: Path) -> int:
    """The largest readable frame number of a label file (1 when there is none)."""
    numbers = [1]
    if path.is_file():
        for line in base.read_lines(path):
            head = line.split(",")[0].strip()
            if head.isascii() and head.isdigit():
                numbers.append(int(head))
    return max(numbers)


def _read_subject(folder: Path, subject: str, table: base.Table):
    """{frame: {AU: intensity}} of one subject's frames that every AU file labels validly, in
    frame order, and where each frame's label is (the file:line that first names it). The
    other frames are skipped and counted here.

    Raises:
      DatasetError: one of the 12 AU files is missing.
    """
    seen: dict[int, set[int]] = {au: set() for au in AUS}
    values: dict[tuple[int, int], int] = {}
    bad: dict[int, tuple[str, str, str]] = {}
    places: dict[int, str] = {}
    files = {}
    for au in AUS:
        path = files[au] = folder / f"{subject}_au{au}.txt"
        if not path.is_file():
            raise base.DatasetError(f"{DATASET}: missing label file {path} (each subject has "
                                    f"{', '.join(f'{subject}_au{a}.txt' for a in AUS)})")
        for number, line in enumerate(base.read_lines(path), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            cells = [c.strip() for c in line.split(",")]
            try:
                frame = int(cells[0])
            except ValueError:
                frame = 0
            if frame < 1:
                table.skips.skip("unreadable frame number", where, line)
                continue
            places.setdefault(frame, where)
            problem = None
            if frame in seen[au]:
                problem = "frame listed twice in an AU file"
            elif len(cells) != 2:
                problem = "wrong number of fields"
            else:
                try:
                    values[au, frame] = int(cells[1])
                except ValueError:
                    problem = "intensity not an integer 0..5"
                else:
                    if not 0 <= values[au, frame] <= MAX_INTENSITY:
                        problem = "intensity not an integer 0..5"
            seen[au].add(frame)
            if problem is not None:
                bad.setdefault(frame, (problem, where, line))
    labels = {}
    for frame in sorted(places):
        if frame in bad:
            table.skips.skip(*bad[frame])
            continue
        missing = next((au for au in AUS if frame not in seen[au]), None)
        if missing is not None:
            table.skips.skip("frame missing from an AU file", str(files[missing]),
                             f"frame {frame}")
            continue
        labels[frame] = {au: values[au, frame] for au in AUS}
    return labels, places


def read(root: Path, split: str, table: base.Table, *, threshold: int = 2,
         frames_dir: str = "frames", frame_naming: str = "auto", fold: int | None = None,
         validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> None:
    """Appends the DISFA frames of `split` to `table` (see the module docstring).

    Raises:
      DatasetError: no label folder, a missing AU file, no frames (or no frame naming that
        fits them), a bad option, or a subject outside the fold partition.
    """
    if threshold not in range(1, MAX_INTENSITY + 1):
        raise base.DatasetError(f"{DATASET}: threshold must be an integer 1..5, got "
                                f"{threshold!r}")
    labels_dir = base.find_file(root, ("ActionUnit_Labels",), DATASET, "AU label folder")
    subjects = sorted(p.name for p in labels_dir.glob("SN*") if p.is_dir())
    if not subjects:
        raise base.DatasetError(f"{DATASET}: {labels_dir} holds no subject folder SN001 ...")
    frames = root / frames_dir
    naming = _naming(frames, labels_dir, subjects, frame_naming)
    for subject in subjects:
        part = fold_split(subject, PARTS, fold, seed, validation_fraction, test_fraction,
                          DATASET)
        if split not in ("all", part):
            continue
        labels, places = _read_subject(labels_dir / subject, subject, table)
        for frame, intensities in labels.items():
            au = base.au_vector({a: int(v >= threshold) for a, v in intensities.items()})
            path = frames / subject / naming.format(i=frame - 1, n=frame)
            table.add(f"{subject}/{frame}", where=places[frame], path=path, au=au,
                      group=subject)
