"""Predictions of a trained network on images, folders and videos (`fbnet predict`).

  predictor = Predictor.from_workdir("runs/synthetic")
  predictor.predict(face_crops)                # uint8 RGB face crops of any size -> numpy arrays
  for row in predictor.predict_files(["photos/", "clip.mp4"]):
      ...                                      # one dict per face (or per image without one)

From a file to a prediction:

1. Reading (`media`). Images are decoded into uint8 RGB and turned upright by their EXIF
   orientation, videos read with OpenCV every `stride`-th frame, folders read recursively in
   sorted order. A file that is not an image or a video by its extension, or cannot be decoded,
   is skipped with a warning naming it and why, and counted: one bad file never stops a run.
2. Faces. OpenCV's frontal-face Haar cascade finds every face of a frame (boxes in the frame's
   pixels, left to right). Each box is cropped square with the margin the network was trained
   with (`training_margin`) by the crop the dataset sources use (`base.crop_face`). With
   `detect=False` the whole image is the face crop (inputs that are crops already).
3. The network. Crops are resized to the model's input by the pipeline's own `ResizeImage` and
   scaled by `InferenceModel.preprocess`, exactly as training fed them, and run in batches of
   `batch_size`. The last batch is padded to the full size, so the jitted network is compiled
   once for the whole run (BatchNorm uses its running statistics: padding changes no result).

Rows (`Predictor.columns`, in this order): file, frame (video frame index; 0 for an image),
face (index in the frame; -1 when none was found), the box x0, y0, x1, y1, the probability of each
expression (columns named by class), expression (the most probable class), the probability of
each AU of the model (AU1, AU2, ...), valence, arousal, and status ("ok", or "no face found" on
the one row of a frame where the detector found none, whose other columns are empty).
Probabilities and valence/arousal are rounded to `DECIMALS` places.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np
import tqdm

from data_pipelines import pipeline, schema, transforms
from data_pipelines.sources import base
from fbnet_jax.core import taxonomy
from fbnet_jax.core.errors import UserError
from fbnet_jax.serve import media
from fbnet_jax.serve.inference import InferenceModel

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".csv", ".jsonl")
OK, NO_FACE = "ok", "no face found"
# Probabilities at 1e-6 are far finer than any decision made on them, and keep files short.
DECIMALS = 6
# The face crop margin when no source of the config has one: the sources' own default.
DEFAULT_MARGIN = inspect.signature(pipeline.dataset_source).parameters["margin"].default
CASCADE_FILE = "haarcascade_frontalface_default.xml"
# Frames are searched for faces at most this large (longest side): the cascade's cost grows
# with the pixel count, and a face too small to find at this size is too small to classify.
DETECT_MAX_SIDE = 1024


def training_margin(config: ml_collections.ConfigDict) -> float:
    """The face crop margin the network was trained with (`config.data.sources.*.margin`).

    Dataset sources crop their faces with a margin; generated sources (synthetic faces) have none,
    their images being whole crops already. With no margin in the config the sources' default
    (0.2) is used; when sources differ, the margin of the most weighted one.
    """
    margins = [(float(s.weight), float(s.margin)) for s in config.data.sources.values()
               if "margin" in s]
    if not margins:
        return float(DEFAULT_MARGIN)
    margin = max(margins, key=lambda wm: wm[0])[1]
    if len({m for _, m in margins}) > 1:
        log.info("the sources were cropped with margins %s; faces are cropped with %g, the most "
                 "weighted source's", sorted({m for _, m in margins}), margin)
    return margin


class FaceDetector:
    """Every frontal face of an RGB image, by OpenCV's bundled Haar cascade."""

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24,
                 max_side: int = DETECT_MAX_SIDE):
        path = cv2.data.haarcascades + CASCADE_FILE
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"{path}: OpenCV cannot load its face detector (is "
                               f"opencv-python-headless installed whole?)")
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_size, self.max_side = min_size, max_side

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The faces of uint8 RGB `image` [H, W, 3] as int boxes [N, 4] (x0, y0, x1, y1) in its
        pixels, left to right (then top to bottom)."""
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(grey.shape))
        if scale < 1.0:
            grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        # Equalising first, as OpenCV's own face detection sample does: the cascade was
        # trained on such images and misses faces in dim or flat-contrast frames otherwise.
        found = self._cascade.detectMultiScale(
            cv2.equalizeHist(grey), scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors, minSize=(self.min_size, self.min_size))
        if len(found) == 0:
            return np.zeros((0, 4), np.int64)
        x, y, w, h = np.asarray(found, np.float64).T
        boxes = np.rint(np.stack([x, y, x + w, y + h], axis=1) / scale).astype(np.int64)
        return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


@dataclasses.dataclass
class Counts:
    """What a `predict_files` run did; filled while its rows are produced."""
    images: int = 0
    videos: int = 0
    frames: int = 0     # images and video frames searched for faces
    faces: int = 0
    no_face: int = 0    # frames where no face was found
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why)

    def summary(self) -> str:
        line = (f"predicted {_n(self.images + self.videos, 'file')} ({_n(self.images, 'image')}, "
                f"{_n(self.videos, 'video')}; {_n(self.frames, 'frame')}): "
                f"{_n(self.faces, 'face')}")
        if self.no_face:
            line += (f"; no face found in {_n(self.no_face, 'frame')} (images that are face "
                     f"crops already need --no_detect)")
        if self.skipped:
            line += f"; skipped {_n(len(self.skipped), 'unreadable file')} (see the warnings)"
        return line


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _outputs(model: InferenceModel, variables, images):
    out = model.apply(images, variables)
    return {"expression_probs": jax.nn.softmax(out["expression_logits"], axis=-1),
            "au_probs": jax.nn.sigmoid(out["au_logits"]), "va": out["va"]}


class Predictor:
    """A checkpoint's network with its input pipeline, from uint8 face crops or files to outputs.

    Attributes:
      model: the `InferenceModel`.
      batch_size: images per network call (every call has this shape).
      margin: the face crop margin (`training_margin` of the model's config by default).
    """

    def __init__(self, model: InferenceModel, batch_size: int = 32, margin: float | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self.margin = training_margin(model.config) if margin is None else float(margin)
        self._resize = transforms.ResizeImage(model.image_size)
        self._variables = jax.device_put(model.variables)
        # The variables are an argument, not constants folded into the program.
        self._apply = jax.jit(functools.partial(_outputs, model))
        self._detector = None

    @classmethod
    def from_workdir(cls, workdir: str | Path, step: int | None = None, batch_size: int = 32,
                     margin: float | None = None) -> Predictor:
        """The checkpoint of `step` (default: the latest) of the run in `workdir`."""
        return cls(InferenceModel.from_workdir(workdir, step), batch_size, margin)

    @property
    def columns(self) -> list[str]:
        """The keys of every row of `predict_files`, in order."""
        return ["file", "frame", "face", "x0", "y0", "x1", "y1", *taxonomy.EXPRESSIONS,
                "expression", *(f"AU{au}" for au in self.model.aus), "valence", "arousal",
                "status"]

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for a batch of face crops.

        Args:
          images: uint8 RGB face crops, [H, W, 3] each (any size; resized to the model's), as a
            sequence or one array [B, H, W, 3].

        Returns:
          expression_probs [B, 7] (softmax, classes of `taxonomy.EXPRESSIONS`), expression [B]
          (its argmax), au_probs [B, A] (sigmoid, AUs of `model.aus`), valence [B], arousal [B].
        """
        batch = np.stack([self._model_input(image, k) for k, image in enumerate(images)]) \
            if len(images) else np.zeros((0, self.model.image_size, self.model.image_size, 3),
                                         np.uint8)
        chunks = [self._run(batch[i:i + self.batch_size])
                  for i in range(0, len(batch), self.batch_size)] or [self._run(batch)]
        out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        return {"expression_probs": out["expression_probs"],
                "expression": out["expression_probs"].argmax(axis=-1),
                "au_probs": out["au_probs"], "valence": out["va"][:, 0],
                "arousal": out["va"][:, 1]}

    def _model_input(self, image: np.ndarray, index: int) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
                or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: expected uint8 RGB [H, W, 3], got {image.dtype} "
                             f"{list(image.shape)}")
        return self._resize.map({schema.IMAGE: image})[schema.IMAGE]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One network call on at most `batch_size` images, padded to exactly that many."""
        n = len(batch)
        padded = np.zeros((self.batch_size, *batch.shape[1:]), np.uint8)
        padded[:n] = batch
        out = jax.device_get(self._apply(self._variables, self.model.preprocess(padded)))
        return {k: np.asarray(v, np.float32)[:n] for k, v in out.items()}

    def predict_files(self, paths: Iterable[str | Path], detect: bool = True, stride: int = 1,
                      progress: bool = False, counts: Counts | None = None
                      ) -> Iterator[dict[str, Any]]:
        """One row (`columns`) per face of every image and video frame of `paths`, in order.

        Args:
          paths: image and video files, and folders (read recursively, in sorted order).
          detect: find the faces; False: every image or frame is a face crop already.
          stride: predict every `stride`-th frame of a video (frames 0, stride, 2 stride, ...).
          progress: show progress bars (files; frames of a video) on a terminal.
          counts: filled with what was predicted and skipped, if given.

        Raises:
          UserError: a path does not exist.
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        # Checked now, not at the first row: the rows are made lazily.
        files = media.media_files(paths)
        counts = Counts() if counts is None else counts
        return self._rows(files, detect, stride, progress, counts)

    def _rows(self, files: list[Path], detect: bool, stride: int, progress: bool,
              counts: Counts) -> Iterator[dict[str, Any]]:
        """The rows of `predict_files`, predicted a batch of faces at a time."""
        bar = tqdm.tqdm(files, desc="predict", unit="file", disable=None if progress else True)
        rows, crops = [], []   # rows in output order, with their face crops (None: no face)
        pending = 0            # crops not predicted yet
        for path in bar:
            try:
                for frame, image in media.frames(path, stride, progress):
                    found = self._faces(str(path), frame, image, detect)
                    faces = sum(crop is not None for _, crop in found)
                    counts.frames += 1
                    counts.faces += faces
                    counts.no_face += faces == 0
                    rows += [row for row, _ in found]
                    crops += [crop for _, crop in found]
                    pending += faces
                    # A full batch of faces, or rows of frames without one that need no network
                    # call: rows are handed on as they come, whatever the length of the input.
                    if pending >= self.batch_size or len(rows) - pending >= self.batch_size \
                            or not pending:
                        yield from self._flush(rows, crops)
                        rows, crops, pending = [], [], 0
            except media.UnreadableFile as e:
                log.warning("%s; skipped", e)
                counts.skipped.append((str(path), str(e)))
                continue
            if path.suffix.lower() in media.VIDEO_EXTENSIONS:
                counts.videos += 1
            else:
                counts.images += 1
        yield from self._flush(rows, crops)

    def _faces(self, file: str, frame: int, image: np.ndarray, detect: bool
               ) -> list[tuple[dict[str, Any], np.ndarray | None]]:
        """The rows of one frame, each with its face crop (None on a "no face found" row)."""
        height, width = image.shape[:2]
        if not detect:
            return [(self._row(file, frame, 0, (0, 0, width, height)), image)]
        if self._detector is None:
            self._detector = FaceDetector()
        boxes = self._detector(image)
        if not len(boxes):
            return [(self._row(file, frame, -1, None), None)]
        return [(self._row(file, frame, k, box), base.crop_face(image, box, self.margin))
                for k, box in enumerate(boxes)]

    def _row(self, file: str, frame: int, face: int, box) -> dict[str, Any]:
        row = dict.fromkeys(self.columns)
        row.update(file=file, frame=frame, face=face, status=OK if face >= 0 else NO_FACE)
        if box is not None:
            row.update(zip(("x0", "y0", "x1", "y1"), (int(v) for v in box)))
        return row

    def _flush(self, rows: list[dict[str, Any]], crops: list[np.ndarray | None]
               ) -> Iterator[dict[str, Any]]:
        """Predicts the crops of `rows` and yields the rows, predictions filled in."""
        faces = [(row, crop) for row, crop in zip(rows, crops) if crop is not None]
        if faces:
            out = self.predict([crop for _, crop in faces])
            aus = [f"AU{au}" for au in self.model.aus]
            for k, (row, _) in enumerate(faces):
                row.update(zip(taxonomy.EXPRESSIONS, _rounded(out["expression_probs"][k])))
                row["expression"] = taxonomy.EXPRESSIONS[int(out["expression"][k])]
                row.update(zip(aus, _rounded(out["au_probs"][k])))
                row["valence"], row["arousal"] = _rounded([out["valence"][k], out["arousal"][k]])
        yield from rows


def _rounded(values) -> list[float]:
    return [round(float(v), DECIMALS) for v in values]


def output_format(out: str | Path) -> str:
    """"csv" or "jsonl", by the extension of `out`.

    Raises:
      UserError: another extension.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: write predictions to a {' or a '.join(OUTPUT_FORMATS)} "
                        f"file (by its extension)")
    return suffix[1:]


def write_rows(rows: Iterable[dict[str, Any]], out: str | Path, columns: Sequence[str]) -> int:
    """Writes rows as CSV (empty cells for None) or JSON lines (null), by `out`'s extension,
    one line per row as it comes; returns the number of rows."""
    fmt = output_format(out)
    count = 0
    with open(out, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
            writer.writeheader()
            write = writer.writerow
        else:
            def write(row):
                f.write(json.dumps(row) + "\n")
        for row in rows:
            write(row)
            count += 1
    return count


def run_command(workdir: str | Path, step: int | None, inputs: Sequence[str | Path],
                out: str | Path, detect: bool = True, stride: int = 1,
                batch_size: int = 32) -> int:
    """`fbnet predict`: writes the rows of `Predictor.predict_files` to `out`, logs what it did.

    Everything that can be checked without the network is checked before it is loaded.

    Returns:
      0, or 1 when not one file could be read.

    Raises:
      UserError: an unknown output extension, a missing input, no image or video among the
        inputs, a stride or batch size below 1, or no checkpoint (of `step`) in `workdir`.
    """
    output_format(out)
    if stride < 1:
        raise UserError(f"--stride {stride}: must be >= 1 (1 predicts every frame)")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be >= 1")
    if not inputs:
        raise UserError("give the images, videos or folders to predict")
    files = media.media_files(inputs, exclude=out)
    extensions = media.IMAGE_EXTENSIONS + media.VIDEO_EXTENSIONS
    if not any(f.suffix.lower() in extensions for f in files):
        raise UserError(f"no image or video among {' '.join(map(str, inputs))} (images: "
                        f"{' '.join(media.IMAGE_EXTENSIONS)}; videos: "
                        f"{' '.join(media.VIDEO_EXTENSIONS)})")
    predictor = Predictor.from_workdir(workdir, step, batch_size=batch_size)
    log.info("predicting with the checkpoint of step %d of %s (%d files, faces %s)",
             predictor.model.step, workdir, len(files),
             f"detected, cropped with margin {predictor.margin:g}" if detect
             else "given: every image is a face crop")
    counts = Counts()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    from tqdm.contrib import logging as tqdm_logging  # pylint: disable=g-import-not-at-top
    with tqdm_logging.logging_redirect_tqdm():   # warnings above the bar, not through it
        rows = predictor.predict_files(files, detect=detect, stride=stride, progress=True,
                                       counts=counts)
        written = write_rows(rows, out, predictor.columns)
    log.info("%s", counts.summary())
    log.info("wrote %d rows to %s", written, out)
    return 0 if counts.images + counts.videos else 1
