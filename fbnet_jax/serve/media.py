"""The inputs of `fbnet predict`: image and video files as uint8 RGB frames, folders as files.

Images (`IMAGE_EXTENSIONS`) are decoded with PIL into uint8 RGB (greyscale, palette, CMYK, 16-bit
and alpha handled as the dataset sources do, `data_pipelines.sources.base.read_image`) and turned
upright by their EXIF orientation, as a photo viewer shows them. Videos (`VIDEO_EXTENSIONS`) are
read with OpenCV, every `stride`-th frame. Folders are read recursively in sorted order; hidden
files are ignored. The extension decides how a file is read; a file that is neither, or cannot be
decoded, raises `UnreadableFile`, which names it and why.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import tqdm
from PIL import Image

from data_pipelines.sources import base
from fbnet_jax.core.errors import UserError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")
_EXIF_ORIENTATION = 0x0112


class UnreadableFile(UserError, ValueError):
    """A file that cannot be read as an image or a video; the message says which and why.

    `read_image` and `read_video` raise it; `fbnet predict` and `Predictor.predict_files` skip
    the file with a warning and count it.
    """


def media_files(inputs: Iterable[str | Path], exclude: str | Path | None = None) -> list[Path]:
    """The files of `inputs`: files as given, folders as every file below them (sorted, hidden
    files and folders left out), `exclude` (the output file) left out.

    Raises:
      UserError: an input does not exist.
    """
    excluded = Path(exclude).resolve() if exclude is not None else None
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found = [path]
        else:
            raise UserError(f"{path}: no such file or folder")
        files += [p for p in found if excluded is None or p.resolve() != excluded]
    return files


def frames(path: Path, stride: int, progress: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, uint8 RGB image) of an image (one frame, 0) or of a video's frames.

    Raises:
      UnreadableFile: the file is not an image or video by its extension, or cannot be decoded.
    """
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        yield from read_video(path, stride, progress)
    elif suffix in IMAGE_EXTENSIONS:
        yield 0, read_image(path)
    else:
        raise UnreadableFile(f"{path}: not an image or a video (by its extension; images: "
                             f"{' '.join(IMAGE_EXTENSIONS)}; videos: "
                             f"{' '.join(VIDEO_EXTENSIONS)})")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3], turned upright by its EXIF orientation.

    Raises:
      UnreadableFile: the file cannot be read or is not a complete image.
    """
    try:
        data = Path(path).read_bytes()
        image = base.read_image(data, str(path))
    except (OSError, base.DatasetError) as e:
        raise UnreadableFile(str(e) if isinstance(e, base.DatasetError)
                             else f"{path}: cannot be read ({e})") from e
    return _orient(image, _exif_orientation(data))


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of an encoded image; 1 (upright) when it has none."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # pylint: disable=broad-except  # a broken EXIF block: show as stored
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """`image` as PIL's `ImageOps.exif_transpose` turns it for `orientation`."""
    transposed = image.transpose(1, 0, 2)
    turned = {
        2: image[:, ::-1], 3: image[::-1, ::-1], 4: image[::-1],
        5: transposed, 6: transposed[:, ::-1], 7: transposed[::-1, ::-1], 8: transposed[::-1],
    }.get(orientation, image)
    return np.ascontiguousarray(turned)


def read_video(path: str | Path, stride: int = 1, progress: bool = False
               ) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, uint8 RGB frame) of every `stride`-th frame of a video, from frame 0.

    Raises:
      UnreadableFile: OpenCV cannot open the file, or decodes no frame of it.
    """
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise UnreadableFile(f"{path}: OpenCV cannot open it as a video")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        bar = tqdm.tqdm(total=-(-total // stride) if total > 0 else None, desc=Path(path).name,
                        unit="frame", leave=False, disable=None if progress else True)
        index = 0
        with bar:
            # grab() skips a frame without converting it; retrieve() converts the kept ones.
            while capture.grab():
                if index % stride == 0:
                    ok, bgr = capture.retrieve()
                    if not ok:
                        break
                    bar.update()
                    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        if index == 0:
            raise UnreadableFile(f"{path}: OpenCV decodes no frame of it")
    finally:
        capture.release()

